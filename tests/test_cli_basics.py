import subprocess
import sys

from medseg.cli.main import COMMAND_MODULES, build_parser


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from medseg.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'nibabel') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"medseg --help imported {out.stdout.strip()}"


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {m.replace("_", "-") for m in COMMAND_MODULES}


def test_closed_pipe_is_quiet(tmp_path):
    """`medseg info x | head -1`: no BrokenPipeError traceback when the reader leaves early."""
    import nibabel as nib
    import numpy as np

    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), path)
    proc = subprocess.Popen([sys.executable, "-m", "medseg.cli.main", "info", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before medseg (still importing) writes anything
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
