"""The grouped CPU LoRA ops (runtime/engine/lora_ops.py, runtime/engine/punica.py) against vLLM's torch ops.

Random inputs: mixed adapters in one batch (contiguous runs and scattered rows), packed slices
(qkv), a vocabulary wider than the output (expand clips), float32 buffers over bfloat16 weights, and
rows without an adapter. vLLM's torch ops index slot -1 as the last slot (a base-model row picks up
that slot's adapter); ours leave such rows alone, as vLLM's GPU kernels do, so rows without an
adapter are compared with the unchanged input, and vLLM's behaviour there is pinned separately.
"""

from __future__ import annotations

import time

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.ops import torch_ops as vllm_ops
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.lora.punica_wrapper.utils import compute_meta

from clora.runtime.engine import lora_ops
from clora.runtime.engine import plugin as lora_plugin
from clora.runtime.engine.lora_ops import TokenGroups
from clora.runtime.engine.punica import GroupedPunicaWrapperCPU

SLOTS, RANK, HIDDEN = 4, 16, 64
MIXES = {
    "one adapter": [2] * 9,
    "contiguous runs": [0, 0, 0, 1, 1, 3, 3, 3, 3],
    "scattered": [1, 0, 1, 3, 0, 2, 1, 3, 2],
    "with base rows": [-1, 1, -1, 0, 0, -1, 3, 1, -1],
}


def stacked(out: int, inner: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SLOTS, 1, out, inner, generator=generator).to(dtype)


def inputs(rows: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def with_adapter(slots: list[int]) -> torch.Tensor:
    return torch.tensor([s >= 0 for s in slots])


@pytest.mark.parametrize("mix", MIXES)
def test_shrink_equals_vllm_on_rows_with_an_adapter(mix):
    slots = torch.tensor(MIXES[mix])
    x, lora_a = inputs(len(slots), HIDDEN), stacked(RANK, HIDDEN, torch.bfloat16)
    ours, theirs = torch.full((len(slots), RANK), 7.0), torch.zeros(len(slots), RANK)
    lora_ops.shrink(ours, x, lora_a, TokenGroups.of(slots), 0.5)
    vllm_ops.bgmv_shrink(x, lora_a, theirs, slots, 0.5)
    has = with_adapter(MIXES[mix])
    torch.testing.assert_close(ours[has], theirs[has], rtol=1e-4, atol=1e-4)
    assert (ours[~has] == 7.0).all()  # no adapter: left as they were


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_equals_vllm(mix, add_inputs):
    slots = torch.tensor(MIXES[mix])
    x, lora_b = inputs(len(slots), RANK), stacked(24, RANK)
    base = inputs(len(slots), 80, seed=2)
    ours, theirs = base.clone(), base.clone()
    lora_ops.expand(ours, x, lora_b, TokenGroups.of(slots), 40, 24, add_inputs)
    vllm_ops.bgmv_expand_slice(x, lora_b, theirs, slots, 40, 24, add_inputs)
    has = with_adapter(MIXES[mix])
    torch.testing.assert_close(ours[has], theirs[has], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours[~has], base[~has])


def test_expand_clips_to_the_narrower_of_weights_and_output():
    """The logits/embedding expand: an adapter's padded vocabulary wider than the model's output."""
    slots = torch.tensor(MIXES["scattered"])
    x, lora_b = inputs(len(slots), RANK), stacked(100, RANK)
    base = inputs(len(slots), 90, seed=3)
    ours, theirs = base.clone(), base.clone()
    lora_ops.expand(ours, x, lora_b, TokenGroups.of(slots), 0, 90, add_inputs=True)
    vllm_ops.bgmv_expand(x, lora_b, theirs, slots, add_inputs=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_prefill_sequences_equal_vllm_sgmv():
    """Prefill: vLLM's sgmv ops take runs of tokens per sequence; ours group the same tokens."""
    token_slots = torch.tensor([1] * 5 + [0] * 3 + [1] * 4 + [2] * 2)
    starts, lengths, run_slots, batches, longest, tokens, _ = compute_meta(token_slots)
    x, lora_a, lora_b = inputs(len(token_slots), HIDDEN), stacked(RANK, HIDDEN), stacked(32, RANK, seed=4)
    groups = TokenGroups.of(token_slots)
    ours, theirs = torch.zeros(len(token_slots), RANK), torch.zeros(len(token_slots), RANK)
    lora_ops.shrink(ours, x, lora_a, groups, 1.0)
    vllm_ops.sgmv_shrink(x, lora_a, theirs, starts, lengths, run_slots, batches, longest, tokens, 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    out_ours, out_theirs = torch.ones(len(token_slots), 32), torch.ones(len(token_slots), 32)
    lora_ops.expand(out_ours, ours, lora_b, groups, 0, 32, add_inputs=True)
    vllm_ops.sgmv_expand(theirs, lora_b, out_theirs, starts, lengths, run_slots, batches, longest, tokens, True)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-4)


def test_groups_know_the_single_adapter_and_each_slots_rows():
    assert TokenGroups.of(torch.tensor([2, 2, 2])).single == 2
    assert TokenGroups.of(torch.tensor([-1, -1])).no_lora and TokenGroups.empty().no_lora
    mixed = TokenGroups.of(torch.tensor([1, 0, -1, 1, 0, 3]))
    assert mixed.single is None and not mixed.no_lora
    assert mixed.order.tolist() == [1, 4, 0, 3, 5] and mixed.runs == ((0, 0, 2), (1, 2, 4), (3, 4, 5))
    assert mixed.present == (0, 1, 3) and mixed.grid_rows.tolist() == [1, 4, 0, 3, 5, 0]  # padded with row 0
    assert mixed.grid_kept.tolist() == [0, 1, 2, 3, 4]
    x = torch.arange(6.0).unsqueeze(1)
    assert mixed.kept(mixed.grid(x)).reshape(-1).tolist() == [1, 4, 0, 3, 5]
    assert TokenGroups.of(torch.tensor([-1, 2])).single is None  # base rows beside one adapter


@pytest.mark.parametrize("mix", ["one adapter", "scattered"])
def test_packed_layers_see_new_weights_written_into_a_slot(mix):
    """The stacked/block-diagonal layouts are cached; vLLM loading another adapter into a slot must show."""
    slots = torch.tensor(MIXES[mix])
    widths = (32, 16, 16)
    x = inputs(len(slots), HIDDEN)
    lora_a = tuple(stacked(RANK, HIDDEN, seed=30 + i) for i in range(3))
    lora_b = tuple(stacked(width, RANK, seed=40 + i) for i, width in enumerate(widths))
    groups = TokenGroups.of(slots)
    before = torch.zeros(len(slots), sum(widths))
    lora_ops.linear(before, x, lora_a, lora_b, widths, groups, 1.0)
    lora_a[0][2, 0].copy_(torch.randn(RANK, HIDDEN))  # as vLLM's set_lora does
    lora_b[2][2, 0].copy_(torch.randn(16, RANK))
    after = torch.zeros(len(slots), sum(widths))
    lora_ops.linear(after, x, lora_a, lora_b, widths, groups, 1.0)
    theirs = torch.zeros(len(slots), sum(widths))
    offset = 0
    for a, b, width in zip(lora_a, lora_b, widths):
        shrunk = torch.zeros(len(slots), RANK)
        vllm_ops.bgmv_shrink(x, a, shrunk, slots, 1.0)
        vllm_ops.bgmv_expand_slice(shrunk, b, theirs, slots, offset, width, True)
        offset += width
    torch.testing.assert_close(after, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after)


def test_vllm_torch_ops_give_base_rows_the_last_slots_adapter():
    """Why rows without an adapter are compared with the input: vLLM's op changes them."""
    x, lora_a = inputs(2, HIDDEN), stacked(RANK, HIDDEN)
    theirs = torch.zeros(2, RANK)
    vllm_ops.bgmv_shrink(x, lora_a, theirs, torch.tensor([-1, -1]), 1.0)
    torch.testing.assert_close(theirs, x @ lora_a[SLOTS - 1, 0].t())
    ours = torch.zeros(2, RANK)
    lora_ops.shrink(ours, x, lora_a, TokenGroups.of(torch.tensor([-1, -1])), 1.0)
    assert not ours.any()


# The wrappers as vLLM calls them: mapping update, then a packed qkv layer, an embedding, the logits.

def wrappers(mapping: LoRAMapping) -> tuple[PunicaWrapperCPU, PunicaWrapperCPU]:
    pair = (GroupedPunicaWrapperCPU(64, 8, "cpu"), PunicaWrapperCPU(64, 8, "cpu"))
    for wrapper in pair:
        wrapper.update_metadata(mapping, [11, 12, 13, 14], SLOTS + 1, 50)
    return pair


@pytest.mark.parametrize("prefill", [False, True])
def test_wrapper_linear_with_packed_slices_equals_vllms(prefill):
    index = (12, 12, 11, 14, 11, 13, 13, 12) if prefill else (12, 11, 14, 13, 11, 12, 14, 13)
    prompt = (12, 11, 14, 13) if prefill else index
    grouped, reference = wrappers(LoRAMapping(index, prompt, is_prefill=prefill))
    x = inputs(len(index), HIDDEN)
    slices = (32, 16, 16)  # q, k, v
    lora_a = tuple(stacked(RANK, HIDDEN, seed=10 + i) for i in range(3))
    lora_b = tuple(stacked(width, RANK, seed=20 + i) for i, width in enumerate(slices))
    base = inputs(len(index), sum(slices), seed=5)
    ours, theirs = base.clone(), base.clone()
    grouped.add_lora_linear(ours, x, lora_a, lora_b, 1.0, slices)
    reference.add_lora_linear(theirs, x, lora_a, lora_b, 1.0, slices)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, base)


def test_wrapper_logits_and_embedding_equal_vllms():
    index = (11, 13, 12, 11, 14)
    grouped, reference = wrappers(LoRAMapping(index, index, is_prefill=False))
    x, lora_a, lora_b = inputs(len(index), HIDDEN), stacked(RANK, HIDDEN), stacked(60, RANK, seed=6)
    base = inputs(len(index), 60, seed=7)
    ours, theirs = base.clone(), base.clone()
    grouped.add_lora_logits(ours, x, lora_a, lora_b, 0.25)
    reference.add_lora_logits(theirs, x, lora_a, lora_b, 0.25)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    embedded = inputs(len(index), RANK, seed=8)
    ours, theirs = base.clone(), base.clone()
    grouped.add_lora_embedding(ours, embedded, lora_b)
    reference.add_lora_embedding(theirs, embedded, lora_b)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_batch_without_adapters_is_left_alone_in_decode():
    grouped, _ = wrappers(LoRAMapping((0, 0, 0), (0, 0, 0), is_prefill=False))
    assert grouped.tokens.no_lora and grouped.requests.no_lora
    base = inputs(3, 32)
    out = base.clone()
    grouped.add_lora_linear(out, inputs(3, HIDDEN), (stacked(RANK, HIDDEN),), (stacked(32, RANK),), 1.0, (32,))
    assert torch.equal(out, base)


# The plugin's switch and version guard.

class _Platform:
    @classmethod
    def get_punica_wrapper(cls) -> str:
        return "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


class _Renamed(PunicaWrapperCPU):
    def add_expand(self, y, x, lora_b_stacked, output_slices, offset=0, add_inputs=True, **kwargs):  # renamed
        return super().add_expand(y, x, lora_b_stacked, output_slices, offset, add_inputs, **kwargs)


def test_the_plugin_fits_this_vllm_and_installs():
    platform = type("Platform", (_Platform,), {})
    assert lora_plugin.incompatibilities(PunicaWrapperCPU, platform) == []
    assert lora_plugin.install(platform, PunicaWrapperCPU)
    assert platform.get_punica_wrapper() == lora_plugin.WRAPPER


def test_a_changed_vllm_signature_keeps_the_plugin_off_with_one_warning(caplog):
    platform = type("Platform", (_Platform,), {})
    with caplog.at_level("WARNING", logger="vllm.clora"):
        assert not lora_plugin.install(platform, _Renamed)
    assert platform.get_punica_wrapper() == _Platform.get_punica_wrapper()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "_Renamed.add_expand" in warnings[0].getMessage()
    assert "vLLM's own CPU LoRA ops serve" in warnings[0].getMessage()


def test_the_plugin_is_on_only_when_clora_asks():
    assert lora_plugin.wanted({"CLORA_GROUPED_LORA": "1"})
    assert not lora_plugin.wanted({"CLORA_GROUPED_LORA": "0"})
    assert not lora_plugin.wanted({})  # a plain `vllm serve` where clora is installed


def test_the_engine_passes_the_setting_to_vllm_in_eager_mode_only(tmp_path, monkeypatch):
    from clora.core.settings import Settings
    from clora.runtime.engine.config import EngineConfig

    def env(**settings) -> str:
        config = EngineConfig.from_settings(Settings(home=tmp_path, **settings).serving, "model", tmp_path, tmp_path)
        return config.env()["CLORA_GROUPED_LORA"]

    monkeypatch.delenv("CLORA_GROUPED_LORA", raising=False)
    assert env() == "1"  # on by default
    assert env(grouped_lora=False) == "0"
    assert env(enforce_eager=False) == "0"  # the grouping is decided in Python per step: no compiled graphs
    monkeypatch.setenv("CLORA_GROUPED_LORA", "false")  # how a user turns it off
    assert env() == "0"


def test_the_engine_caps_vllms_spin_at_a_few_milliseconds_by_default(tmp_path):
    """benchmarks/engine_spin.py: vLLM's 1 s spin costs the co-located trainer (and the engine) a
    fifth of their time on two cores; the cap is the default, vLLM's own only when asked."""
    from clora.core.settings import Settings
    from clora.runtime.engine.config import EngineConfig

    def env(**settings) -> dict[str, str]:
        return EngineConfig.from_settings(Settings(home=tmp_path, **settings).serving, "model", tmp_path, tmp_path).env()

    assert env()["CLORA_ENGINE_SPIN_S"] == "0.005"
    assert env(engine_spin_s=1.0)["CLORA_ENGINE_SPIN_S"] == "1.0"  # vLLM's own length
    assert "CLORA_ENGINE_SPIN_S" not in env(engine_spin_s=None)  # vLLM's own reader, untouched


@pytest.fixture
def zmq_context():
    """A zmq context whose sockets are all closed at teardown: one collected with sockets still
    open (a failed assertion's traceback holds them) blocks its finaliser, and so the test run."""
    import zmq

    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _reader_and_writer(context, tmp_path):
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    tmp_path.mkdir()
    address = f"ipc://{tmp_path / 'notify'}"
    writer = SpinCondition(is_reader=False, context=context, notify_address=address)
    reader = SpinCondition(is_reader=True, context=context, notify_address=address)
    return reader, writer


def _wait_s(reader, timeout_ms: int) -> float:
    started = time.perf_counter()
    reader.wait(timeout_ms=timeout_ms)
    return time.perf_counter() - started


def test_engine_readers_block_instead_of_spinning_when_clora_caps_the_spin(tmp_path, monkeypatch, zmq_context):
    """vLLM's reader spins (returns at once, to be called again) for 1 s after a read; capped at
    0 it blocks on the notification socket until the writer notifies or the timeout passes."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    # vLLM's own reader, whatever this process's engine did to it (all restored after the test).
    monkeypatch.setattr(SpinCondition, "__init__", getattr(SpinCondition, "clora_vllm_init", SpinCondition.__init__))
    monkeypatch.delattr(SpinCondition, "clora_vllm_init", raising=False)
    monkeypatch.delattr(SpinCondition, "clora_spin_s", raising=False)
    reader, _ = _reader_and_writer(zmq_context, tmp_path / "a")
    assert reader.busy_loop_s == 1 and _wait_s(reader, 200) < 0.05  # vLLM's own: a spin

    assert not lora_plugin.limit_spin({})  # unset: vLLM's behaviour
    assert lora_plugin.limit_spin({"CLORA_ENGINE_SPIN_S": "0"})
    reader, writer = _reader_and_writer(zmq_context, tmp_path / "b")
    assert reader.busy_loop_s == 0 and writer.busy_loop_s == 0
    assert _wait_s(reader, 200) >= 0.15  # blocked until the timeout
    writer.notify()
    assert _wait_s(reader, 2000) < 0.5  # woken by the writer
    wrapped = SpinCondition.__init__
    assert lora_plugin.limit_spin({"CLORA_ENGINE_SPIN_S": "0.5"})  # a second call updates, no double wrap
    assert SpinCondition.__init__ is wrapped
    assert _reader_and_writer(zmq_context, tmp_path / "c")[0].busy_loop_s == 0.5


def test_the_spin_cap_is_for_cpu_engines_only(tmp_path, monkeypatch, zmq_context):
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setattr(SpinCondition, "__init__", getattr(SpinCondition, "clora_vllm_init", SpinCondition.__init__))
    monkeypatch.delattr(SpinCondition, "clora_vllm_init", raising=False)
    monkeypatch.delattr(SpinCondition, "clora_spin_s", raising=False)
    assert not lora_plugin.limit_spin({"CLORA_ENGINE_SPIN_S": "0"}, cpu=False)
    assert _reader_and_writer(zmq_context, tmp_path / "gpu")[0].busy_loop_s == 1  # vLLM's own spin


def test_a_bad_spin_setting_leaves_vllm_alone_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="vllm.clora"):
        assert not lora_plugin.limit_spin({"CLORA_ENGINE_SPIN_S": "fast"})
    assert "spin limit off" in caplog.text
