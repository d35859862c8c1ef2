"""zerostep.accelerator: DeepSpeed's get_accelerator() over CUDA or the CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

import zerostep.accelerator as acc
from zerostep.accelerator import CPU_Accelerator, CUDA_Accelerator, DeepSpeedAccelerator, host_memory

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh(monkeypatch):
    """get_accelerator() chooses again, and the test's choice does not outlive it."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    acc.set_accelerator(None)
    yield monkeypatch
    acc.set_accelerator(None)


def test_choice_follows_the_machine_and_ds_accelerator(fresh):
    chosen = acc.get_accelerator()
    assert chosen is acc.get_accelerator()  # made once
    expected = CUDA_Accelerator if torch.cuda.is_available() else CPU_Accelerator
    assert type(chosen) is expected and acc.is_current_accelerator_supported()
    acc.set_accelerator(None)
    fresh.setenv("DS_ACCELERATOR", "cpu")
    assert isinstance(acc.get_accelerator(), CPU_Accelerator)
    acc.set_accelerator(None)
    fresh.setenv("DS_ACCELERATOR", "cuda")
    assert isinstance(acc.get_accelerator(), CUDA_Accelerator)
    for name, message in (("xpu", "runs on"), ("tpu", "must be one of")):
        acc.set_accelerator(None)
        fresh.setenv("DS_ACCELERATOR", name)
        with pytest.raises(ValueError, match=message):
            acc.get_accelerator()
    with pytest.raises(TypeError, match="not a subclass of DeepSpeedAccelerator"):
        acc.set_accelerator(object())
    mine = CPU_Accelerator()
    acc.set_accelerator(mine)
    assert acc.get_accelerator() is mine


def test_cpu_devices_and_streams(monkeypatch):
    cpu = CPU_Accelerator()
    assert (cpu._name, cpu.name, cpu.communication_backend_name()) == ("cpu", "cpu", "gloo")
    assert cpu.device_name() == cpu.device_name(3) == cpu.current_device_name() == "cpu"
    assert cpu.device(1) == torch.device("cpu") and cpu.is_available()
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert cpu.current_device() == 2
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert cpu.device_count() == 4
    monkeypatch.delenv("LOCAL_SIZE")
    assert cpu.device_count() >= 1  # NUMA nodes with CPUs
    assert cpu.is_synchronized_device() and cpu.use_host_timers() and cpu.resolves_data_dependency()
    assert cpu.handles_memory_backpressure()
    assert cpu.Stream is None and cpu.Event is None and cpu.current_stream() is None
    with cpu.stream(None), cpu.capture_to_graph(cpu.create_graph()):
        cpu.synchronize()
    cpu.set_device(0)
    assert cpu.range_push("x") is None and cpu.range_pop() is None
    assert cpu.lazy_call(lambda: 7) == 7
    assert cpu.amp() is torch.cpu.amp and cpu.random() is torch.random
    t = torch.ones(2)
    assert cpu.on_accelerator(t) and cpu.pin_memory(t) is t and not cpu.is_pinned(t)
    assert cpu.FloatTensor([1, 2]).dtype == torch.float32 and cpu.LongTensor([1]).dtype == torch.int64
    assert cpu.BFloat16Tensor([1.0]).dtype == torch.bfloat16 and cpu.IntTensor([1]).device.type == "cpu"
    assert cpu.is_bf16_supported() and cpu.supported_dtypes()[:2] == [torch.float32, torch.bfloat16]
    assert (torch.float16 in cpu.supported_dtypes()) == cpu.is_fp16_supported()
    assert cpu.create_op_builder("FusedAdamBuilder") is None and not cpu.is_triton_supported()
    assert cpu.get_compile_backend() == "inductor"
    with pytest.raises(ValueError, match="not supported"):
        cpu.set_compile_backend("no-such-backend")
    env: dict[str, str] = {}
    cpu.set_visible_devices_envs(env, [0, 2])
    assert env == {"CUDA_VISIBLE_DEVICES": "0,2"}


def test_cpu_seeds_repeat():
    cpu = CPU_Accelerator()
    cpu.manual_seed(3)
    first = torch.rand(4)
    cpu.manual_seed_all(3)
    assert torch.equal(torch.rand(4), first) and cpu.initial_seed() == 3
    state = cpu.get_rng_state()
    a = torch.rand(2)
    cpu.set_rng_state(state)
    assert torch.equal(torch.rand(2), a) and cpu.default_generator(0) is torch.default_generator


def test_cpu_memory_figures_track_the_resident_set():
    cpu = CPU_Accelerator()
    cpu.reset_peak_memory_stats()
    before = cpu.memory_allocated()
    block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
    during = cpu.memory_allocated()
    assert during - before > 12 * 2**20
    del block
    assert cpu.max_memory_allocated() >= during
    stats = cpu.memory_stats()
    assert stats["allocated_bytes.all.peak"] >= stats["allocated_bytes.all.current"] > 0
    assert cpu.total_memory() > cpu.available_memory() > 0
    assert cpu.memory_reserved() > 0 and cpu.max_memory_reserved() >= during
    assert cpu.empty_cache() is None and host_memory.numa_nodes_with_cpus() >= 1


def test_cuda_answers_without_touching_a_gpu():
    cuda = CUDA_Accelerator()
    assert (cuda.name, cuda.communication_backend_name()) == ("cuda", "nccl")
    assert (cuda.device_name(), cuda.device_name(2)) == ("cuda", "cuda:2")
    assert cuda.device(1) == torch.device("cuda", 1) and not cuda.is_synchronized_device()
    assert not cuda.on_accelerator(torch.ones(1)) and cuda.export_envs() == ["NCCL"]
    assert cuda.Stream is torch.cuda.Stream and cuda.Event is torch.cuda.Event
    if not torch.cuda.is_available():  # DeepSpeed answers True while no GPU is visible (e.g. building)
        assert cuda.is_bf16_supported() and cuda.is_fp16_supported() and not cuda.is_available()


def test_an_accelerator_for_another_device_subclasses_the_interface():
    class Incomplete(DeepSpeedAccelerator):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete("xpu", "ccl")


@needs_cuda
def test_cuda_device_memory_and_streams():
    cuda = CUDA_Accelerator()
    cuda.set_device(0)
    assert cuda.current_device() == 0 and cuda.current_device_name() == "cuda:0" and cuda.device_count() >= 1
    cuda.reset_peak_memory_stats()
    before = cuda.memory_allocated()
    block = cuda.FloatTensor([0.0]).new_empty(2**20)
    assert cuda.memory_allocated() - before >= 4 * 2**20 and cuda.on_accelerator(block)
    assert cuda.max_memory_allocated() >= cuda.memory_allocated() and cuda.memory_reserved() > 0
    assert cuda.total_memory() > cuda.available_memory() > 0
    stream = cuda.Stream()
    with cuda.stream(stream):
        block.add_(1)
    event = cuda.Event()
    event.record(stream)
    cuda.synchronize()
    assert event.query() and cuda.current_stream() == cuda.default_stream()
    pinned = cuda.pin_memory(torch.ones(4))
    assert cuda.is_pinned(pinned)
    cuda.manual_seed_all(5)
    first = torch.rand(3, device="cuda")
    cuda.manual_seed(5)
    assert torch.equal(torch.rand(3, device="cuda"), first) and cuda.initial_seed() == 5
    cuda.range_push("zerostep")
    cuda.range_pop()
    assert torch.float32 in cuda.supported_dtypes()
    with contextlib.suppress(RuntimeError):  # nccl may be absent from a build; the call must exist
        cuda.communication_backend_version()
