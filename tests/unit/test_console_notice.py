"""The DeepSpeed comm-op notice: two lines on rank 0 when the op is not built
yet, nothing once it is in torch's extension cache or on other ranks."""
import os

import pytest

pytest.importorskip("deepspeed")

from moe_train.console import deepspeed_comm_op_notice  # noqa: E402


def test_notice_only_when_the_op_must_be_built(tmp_path, monkeypatch, capsys):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip("this accelerator has no shared-memory comm op")
    with deepspeed_comm_op_notice(is_main=False):
        pass
    assert capsys.readouterr().out == ""
    with deepspeed_comm_op_notice(is_main=True):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("building DeepSpeed's CPU comm op, about 40 s once")
    assert lines[1].startswith("built DeepSpeed's CPU comm op in ")
    build_dir = _get_build_directory(builder.NAME, verbose=False)
    open(os.path.join(build_dir, builder.NAME + ".so"), "w").close()
    with deepspeed_comm_op_notice(is_main=True):
        pass
    assert capsys.readouterr().out == ""
