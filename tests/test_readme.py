"""The README's two first commands are the ones CI and users run."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if not line.startswith("#")]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = _readme_commands()
    assert demo.endswith("python3 -m topv.demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_readme_python_snippets_run_as_pasted():
    # On whatever device the machine has (CPU here); each block in a fresh interpreter.
    import re
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert out.returncode == 0, f"README snippet failed:\n{code}\n{out.stderr[-3000:]}"


def test_readme_tables_are_the_benchmark_results():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
