import subprocess
import sys


def test_import_tunegate_and_cli_do_not_import_torch():
    code = "import sys, tunegate, tunegate.cli, tunegate.config, tunegate.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_runs_without_torch():
    code = (
        "import sys\n"
        "from tunegate.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "print(r.exit_code, 'torch' in sys.modules, 'golden' in r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False", "True"]
