"""The guest contract is named once: no module repeats envd's port, PATH or bundle path."""

from __future__ import annotations

from pathlib import Path

import sandboxd
from sandboxd.envd import contract

SRC = Path(sandboxd.__file__).parent


def test_contract_values_are_written_only_in_the_contract() -> None:
    literals = [str(contract.ENVD_PORT), contract.DEFAULT_PATH, f'"{contract.BUNDLE_PATH_IN_SANDBOX}"',
                f'"{contract.DEFAULT_WORKDIR}"', f'"{contract.SUDO}"']
    repeats = []
    for path in SRC.rglob("*.py"):
        if path.name == "contract.py" or "rpc" in path.parts:
            continue
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#") and not line.lstrip().startswith(('"""', "``")))
        repeats += [f"{path.relative_to(SRC)}: {lit}" for lit in literals if lit in code]
    assert repeats == []


def test_envd_is_started_with_only_the_flags_it_defines() -> None:
    """Seed 000: a wrapper passed ``--debug`` and envd never started."""
    argv = contract.envd_argv(port=contract.ENVD_PORT)
    envd_args = argv[argv.index("sandboxd.envd") + 1:]
    assert envd_args == ["--port", str(contract.ENVD_PORT)]
    assert contract.envd_env()["PATH"] == contract.DEFAULT_PATH
    assert not any(k.startswith("PYTHON") for k in contract.envd_env())
