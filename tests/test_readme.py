"""README.md as a newcomer meets it: its first Python block and the compiled one run as written in an empty
folder, it names exactly the two commands that .ci/run and a newcomer copy, and what pip installs claims no
generic top-level import name (`kernels` and `models` are other distributions')."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def run_python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_first_python_block_runs_as_written_in_an_empty_folder(tmp_path):
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    result = run_python(snippet, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapters" / "animals" / "adapter_model.safetensors").is_file()
    assert result.stdout.count("trainable params") == 2


@pytest.mark.slow
def test_the_compiled_block_runs_as_written_in_an_empty_folder(tmp_path):
    """The '## Compiled' section's block: torch.compile's defaults (Inductor's C++ backend here)."""
    snippet = re.search(r"## Compiled\n.*?```python\n(.*?)```", README, re.S).group(1)
    result = run_python(snippet, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "adapters" / "first" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("marker", ["bench-command", "test-command"])
def test_each_of_the_two_commands_is_one_marked_bash_line(marker):
    blocks = re.findall(rf"<!-- {marker} -->\n```bash\n(.*?)```", README, re.S)
    assert len(blocks) == 1 and blocks[0].count("\n") == 1 and blocks[0].startswith("pip install -e ")
    assert README.count("<!-- ") == 2  # no third marked command


def test_ci_runs_the_readme_test_command():
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_outside_the_clone_only_the_lowrank_name_is_ours(tmp_path):
    """From a folder outside the checkout, `kernels` and `models` resolve to nothing of ours (another
    distribution may own them), while lowrank.kernels and lowrank.models are ours."""
    code = (
        "import importlib.util, json\n"
        "from lowrank.kernels import lora_matmul\n"
        "from lowrank.models import from_pretrained\n"
        "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in ('kernels', 'models')}))\n"
    )
    result = run_python(code, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, origin in json.loads(result.stdout).items():  # another distribution's (in a venv) is fine
        ours = (ROOT / "lowrank", ROOT / name)
        assert origin is None or not any(Path(origin).resolve().is_relative_to(p) for p in ours), (name, origin)
        assert not (ROOT / name).exists(), f"a top-level {name}/ shadows the `{name}` distribution from the root"
