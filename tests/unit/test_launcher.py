"""Device specs of `farm worker --devices` (pure)."""

import pytest

from farm.config import Config
from workers.launcher import parse_devices, slot_env, worker_command


def test_auto_takes_every_gpu_or_one_cpu_worker():
    slots = parse_devices("auto", gpus=3, cores=16)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2"]
    assert {s.device for s in slots} == {"cuda:0"}  # each process sees only its own GPU
    assert [s.label for s in parse_devices("auto", gpus=0, cores=8)] == ["cpu0"]


def test_cpu_workers_split_the_cores():
    slots = parse_devices("cpu:2", gpus=0, cores=8)
    assert [s.label for s in slots] == ["cpu0", "cpu1"]
    assert all(s.env["OMP_NUM_THREADS"] == "4" and s.env["CUDA_VISIBLE_DEVICES"] == ""
               for s in slots)  # fmt: skip
    assert all(s.env["OMP_WAIT_POLICY"] == "PASSIVE" for s in slots)  # they share the cores


def test_listed_gpus():
    assert [s.label for s in parse_devices("cuda:1,3", gpus=4, cores=8)] == ["cuda:1", "cuda:3"]


@pytest.mark.parametrize("bad", ["gpu", "cpu:x", "cpu:0", "cuda:", "cuda:1,1", "cuda:a"])
def test_bad_device_specs_are_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match="--devices"):
        parse_devices(bad, gpus=2, cores=4)


def test_worker_process_is_pinned_and_uses_the_threads_pool():
    slot = parse_devices("cuda:2", gpus=4, cores=8)[0]
    cmd = worker_command(slot, Config.from_env({}), "node7")
    assert cmd[cmd.index("--pool") + 1] == "threads"
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert cmd[cmd.index("--hostname") + 1] == "cuda2@node7"
    env = slot_env(slot)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["FARM_DEVICE"] == "cuda:0"
