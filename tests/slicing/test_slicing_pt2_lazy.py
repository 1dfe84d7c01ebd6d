"""Shard-only loading of a torch.export archive: a stage reads only its own blocks' weights.

The archive is exported from a zoo-style residual CNN, split into two stages by ``build_stage``
(the agent's own path); each stage's parameters are real, exactly its blocks', read by name from
the archive (``ArchiveWeights.read``), and the two stages in a row equal the exported program.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amp4ec.node_agent import executor
from amp4ec.node_agent.executor import build_stage
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.slicing.pt2_lazy import ArchiveWeights
from amp4ec.wire.stage import StageConfig
from tests.model_zoo import ResidualNet


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.export.ExportedProgram]:
    torch.manual_seed(7)
    program = torch.export.export(ResidualNet().eval(), (torch.randn(1, 3, 16, 16),))
    path = tmp_path_factory.mktemp("pt2") / "residual.pt2"
    torch.export.save(program, path)
    return path, program


def test_an_archive_can_stay_on_the_meta_device(archive: tuple[Path, torch.export.ExportedProgram]) -> None:
    path, program = archive
    lazy = load_model(ModelSource(str(path)), materialise=False)
    assert lazy.lazy and isinstance(lazy.state, ArchiveWeights)
    assert all(p.is_meta for p in lazy.module.parameters())
    assert lazy.state.read == []  # nothing read yet
    assert set(lazy.state) == set(program.state_dict)
    eager = load_model(ModelSource(str(path)))
    assert not eager.lazy and not any(p.is_meta for p in eager.module.parameters())


def test_each_stage_reads_and_holds_only_its_blocks_and_the_chain_equals_the_program(
    archive: tuple[Path, torch.export.ExportedProgram], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, program = archive
    whole = split_model(load_model(ModelSource(str(path))))
    last = len(whole) - 1
    assert last >= 2
    read: list[list[str]] = []
    loader = executor.load_model

    def witness(source: ModelSource, *, materialise: bool = True) -> object:
        loaded = loader(source, materialise=materialise)
        assert isinstance(loaded.state, ArchiveWeights), "a stage loads the archive lazily"
        read.append(loaded.state.read)
        return loaded

    monkeypatch.setattr(executor, "load_model", witness)
    stages = [build_stage(StageConfig(str(path), 0, 1)), build_stage(StageConfig(str(path), 2, last))]
    for stage, names in zip(stages, read, strict=True):
        own = {n for b in stage.shard.blocks for n, _ in b.named_parameters()}
        assert own and not any(p.is_meta for p in stage.shard.parameters())
        assert set(names) == own | {n for b in stage.shard.blocks for n, _ in b.named_buffers()}
        cfg = stage.config
        assert stage.shard.param_bytes == whole.shard(cfg.first_block, cfg.last_block).param_bytes
    assert not set(read[0]) & set(read[1])  # no weight read twice across the two stages
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = program.module()(x)
        torch.testing.assert_close(stages[1].shard(*stages[0].shard(x))[0], expected, rtol=0, atol=0)
