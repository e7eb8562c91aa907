"""Issue [2/4]: each rank holds only its shard, and the node reads each byte from storage once.

A tiny transformers Llama (random weights, several safetensors shards with an index) on SeaweedFS.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from weightd import client
from weightd.daemon.plan import DIRECT_IO_BLOCK

from tests.conftest import S3Server, fp8_linear, in_own_mount, run_client

TP_SIZES = (2, 4)
# Fewer KV heads than the largest tp_size: there the default plan gives consecutive ranks the same head.
KV_HEADS = 2


@pytest.fixture(scope="session")
def tiny_llama_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=KV_HEADS,
        num_hidden_layers=4, vocab_size=1024, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory, max_shard_size="3MB")
    assert len(list(directory.glob("*.safetensors"))) >= 3 and (directory / "model.safetensors.index.json").exists()
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_directory: Path, s3_server: S3Server) -> tuple[str, dict[str, torch.Tensor]]:
    s3_server.upload(tiny_llama_directory, "models", "tiny-llama/")
    tensors: dict[str, torch.Tensor] = {}
    for file in glob.glob(f"{tiny_llama_directory}/*.safetensors"):
        tensors |= load_file(file)
    return "s3://models/tiny-llama/", tensors


@pytest.fixture
def daemon(daemon_factory, s3_server: S3Server):
    return daemon_factory(s3_server.env())


def default_dim(name: str) -> int | None:
    if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")):
        return 0
    if "o_proj" in name or "down_proj" in name:
        return 1
    return None


def distinct_slices(name: str, tp_size: int) -> int:
    """How many different slices the ranks hold: KV heads stay whole, so at most KV_HEADS for k/v."""
    return min(tp_size, KV_HEADS) if ("k_proj" in name or "v_proj" in name) else tp_size


def check_rank(
    model: client.AttachedModel, full: dict[str, torch.Tensor], tp_size: int, *, names: set[str] | None = None
) -> None:
    """Every tensor of ``full`` (or just ``names``) is this rank's slice."""
    if names is None:
        assert set(model.tensors) == set(full)
    for name, tensor in full.items():
        if names is not None and name not in names:
            continue
        dim = default_dim(name)
        assert model.shards[name] == dim
        if dim is None:
            want = tensor
        else:
            parts = distinct_slices(name, tp_size)
            size = tensor.shape[dim] // parts
            want = tensor.narrow(dim, model.rank * parts // tp_size * size, size)
        assert model.tensors[name].is_contiguous()
        assert torch.equal(model.tensors[name], want), (name, model.rank)


@pytest.mark.parametrize("storage", ["s3", "local"])  # pieces read once and copied out; every piece direct
@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_all_ranks_load_reads_each_byte_once(daemon, tiny_llama, tiny_llama_directory: Path, tp_size: int,
                                             storage: str) -> None:
    uri, full = tiny_llama
    if storage == "local":
        uri = str(tiny_llama_directory)
    model_bytes = sum(t.nbytes for t in full.values())
    loaded = subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "load", uri, "--tp-size", str(tp_size), "--target", daemon.target],
        capture_output=True, text=True, timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    rows = json.loads(subprocess.run(
        [sys.executable, "-m", "weightd.daemon", "ls", "--json", "--target", daemon.target],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout)
    assert sorted((r["tp_size"], r["rank"]) for r in rows) == [(tp_size, r) for r in range(tp_size)]
    assert sum(r["storage_bytes_read"] for r in rows) <= 1.02 * model_bytes
    assert sum(r["storage_bytes_read"] for r in rows) == model_bytes

    ranks = [client.attach(uri, rank, tp_size=tp_size, target=daemon.target) for rank in range(tp_size)]
    try:
        for model in ranks:
            check_rank(model, full, tp_size)
        # The ranks share one group arena, which holds each byte of the model once (replicated tensors and KV heads
        # that ranks share included), plus alignment (from local files: each file where it agrees with the
        # file's offsets, for O_DIRECT, up to a block apart); each rank is shown an even share of it.
        resident = [r["resident_bytes"] for r in rows]
        assert max(resident) - min(resident) < tp_size
        assert model_bytes <= sum(resident) < model_bytes + 256 * len(full) * (tp_size + 1)
        files = len(list(tiny_llama_directory.glob("*.safetensors"))) if storage == "local" else 0
        assert sum(resident) < sum(t.nbytes for m in ranks for t in m.tensors.values()) + DIRECT_IO_BLOCK * files
        for name, tensor in full.items():
            dim = default_dim(name)
            if dim is not None:
                distinct = ranks[:: tp_size // distinct_slices(name, tp_size)]  # ranks sharing a KV head
                assert torch.equal(torch.cat([m.tensors[name] for m in distinct], dim=dim), tensor)
        # Attaching read nothing more.
        assert sum(m.storage_bytes_read for m in daemon.models()) == model_bytes
    finally:
        for model in ranks:
            model.close()


def test_lone_rank_reads_only_its_share(daemon, tiny_llama) -> None:
    uri, full = tiny_llama
    tp_size, rank = 4, 1
    with client.attach(uri, rank, tp_size=tp_size, target=daemon.target) as model:
        check_rank(model, full, tp_size)
    (row,) = daemon.models()
    # Dim-0 slices are read alone; o_proj/down_proj rows here are far below the 1 MiB row-range threshold,
    # so those tensors are read whole and sliced in memory; replicated tensors are read whole.
    expected = sum(t.nbytes // distinct_slices(n, tp_size) if default_dim(n) == 0 else t.nbytes
                   for n, t in full.items())
    model_bytes = sum(t.nbytes for t in full.values())
    assert row.storage_bytes_read == expected
    assert row.storage_bytes_read < 0.6 * model_bytes
    assert row.resident_bytes < 0.3 * model_bytes


def test_ranks_attach_from_separate_processes_while_a_group_load_runs(daemon, tiny_llama) -> None:
    uri, full = tiny_llama
    loader = subprocess.Popen(
        [sys.executable, "-m", "weightd.daemon", "load", uri, "--tp-size", "2", "--target", daemon.target],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(daemon.models()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Each rank reports its sums and the arena files it maps, and whether its tensors lie in those read-only maps.
    script = (
        "import json, sys; from weightd import client\n"
        "m = client.attach(sys.argv[1], int(sys.argv[3]), tp_size=2, target=sys.argv[2])\n"
        "maps = [l.split() for l in open('/proc/self/maps') if '/dev/shm/weightd-' in l]\n"
        "spans = [tuple(int(x, 16) for x in l[0].split('-')) for l in maps]\n"
        "inside = all(any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in spans)\n"
        "             for t in m.tensors.values())\n"
        "print(json.dumps({'sums': {n: float(t.float().sum()) for n, t in m.tensors.items()}, 'inside': inside,\n"
        "                  'files': sorted({l[-1] for l in maps}), 'read_only': all(l[1][1] == '-' for l in maps)}))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, uri, daemon.target, str(r)], stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    reports = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert loader.wait(timeout=300) == 0
    name = "model.layers.0.mlp.gate_proj.weight"
    half = full[name].shape[0] // 2
    for rank, report in enumerate(reports):
        assert report["sums"][name] == pytest.approx(float(full[name][rank * half : (rank + 1) * half].float().sum()))
        assert report["inside"] and report["read_only"]  # zero-copy views of read-only shared memory
    # Both ranks map the one group arena.
    assert reports[0]["files"] == reports[1]["files"] and len(reports[0]["files"]) == 1
    assert sum(m.storage_bytes_read for m in daemon.models()) == sum(t.nbytes for t in full.values())


def test_custom_rules_on_a_model_without_a_plan(daemon_factory, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "encoder.0.attn.qkv.weight": torch.randn(96, 32, generator=g),
        "encoder.0.ffn.out.weight": torch.randn(32, 64, generator=g),
        "encoder.0.ln.weight": torch.randn(32, generator=g),
    }
    directory = tmp_path / "encoder"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "my-encoder"}))
    daemon = daemon_factory()
    with pytest.raises(client.PreconditionFailedError, match="no default tensor-parallel plan for model_type 'my-enc"):
        client.attach(str(directory), 0, tp_size=2, target=daemon.target)
    rules = [client.ShardRule(r"attn\.qkv", 0), client.ShardRule(r"ffn\.out", 1), client.ShardRule(r"ln", None)]
    for rank in range(2):
        with client.attach(str(directory), rank, tp_size=2, shard_rules=rules, target=daemon.target) as model:
            assert dict(model.shards) == {
                "encoder.0.attn.qkv.weight": 0, "encoder.0.ffn.out.weight": 1, "encoder.0.ln.weight": None
            }
            qkv, out = tensors["encoder.0.attn.qkv.weight"], tensors["encoder.0.ffn.out.weight"]
            assert torch.equal(model.tensors["encoder.0.attn.qkv.weight"], qkv[rank * 48 : (rank + 1) * 48])
            assert torch.equal(model.tensors["encoder.0.ffn.out.weight"], out[:, rank * 32 : (rank + 1) * 32])
            assert torch.equal(model.tensors["encoder.0.ln.weight"], tensors["encoder.0.ln.weight"])
    # Different rules are a different resident entry; tp_size 1 needs no plan.
    with client.attach(str(directory), target=daemon.target) as whole:
        assert torch.equal(whole.tensors["encoder.0.ffn.out.weight"], tensors["encoder.0.ffn.out.weight"])


def test_an_fp8_checkpoint_with_per_channel_and_per_tensor_scales(daemon_factory, tmp_path: Path) -> None:
    """FP8 weights come out as float8 tensors, bit for bit; under TP, per-channel scales follow column-parallel
    weights, a row-parallel weight's per-channel scale and per-tensor scales stay whole on every rank."""
    g = torch.Generator().manual_seed(4)
    attn = "model.layers.0.self_attn"
    tensors = fp8_linear(f"{attn}.q_proj", 8, 6, g) | fp8_linear(f"{attn}.o_proj", 6, 8, g)
    directory = tmp_path / "fp8"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_key_value_heads": 2}))
    daemon = daemon_factory()

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    with client.attach(str(directory), target=daemon.target) as whole:
        for name, tensor in tensors.items():
            assert whole.tensors[name].dtype == tensor.dtype and torch.equal(bits(whole.tensors[name]), bits(tensor))
    for rank in range(2):
        with client.attach(str(directory), rank, tp_size=2, target=daemon.target) as model:
            assert model.shards[f"{attn}.q_proj.weight_scale"] == 0 and model.shards[f"{attn}.o_proj.weight"] == 1
            want = {
                f"{attn}.q_proj.weight": tensors[f"{attn}.q_proj.weight"][rank * 4 : (rank + 1) * 4],
                f"{attn}.q_proj.weight_scale": tensors[f"{attn}.q_proj.weight_scale"][rank * 4 : (rank + 1) * 4],
                f"{attn}.o_proj.weight": tensors[f"{attn}.o_proj.weight"][:, rank * 4 : (rank + 1) * 4],
            }
            for name, tensor in tensors.items():
                expected = want.get(name, tensor)  # the rest whole: a row-parallel per-channel scale, per-tensor ones
                got = model.tensors[name]
                assert got.shape == expected.shape and torch.equal(bits(got), bits(expected.contiguous())), name


def test_fused_projections_are_served_as_one_tensor_per_module(daemon, tiny_llama) -> None:
    uri, full = tiny_llama
    fusions = [client.Fusion("qkv_proj", ("q_proj", "k_proj", "v_proj")),
               client.Fusion("gate_up_proj", ("gate_proj", "up_proj"))]
    client.load(uri, tp_size=2, all_ranks=True, fusions=fusions, target=daemon.target)
    for rank in range(2):
        with client.attach(uri, rank, tp_size=2, fusions=fusions, target=daemon.target) as model:
            for layer in range(4):
                prefix = f"model.layers.{layer}"
                for fused, parts in ((f"{prefix}.self_attn.qkv_proj.weight", ("q_proj", "k_proj", "v_proj")),
                                     (f"{prefix}.mlp.gate_up_proj.weight", ("gate_proj", "up_proj"))):
                    module = fused.rsplit(".", 2)[0]
                    want = torch.cat([full[f"{module}.{p}.weight"].chunk(2)[rank] for p in parts])
                    assert torch.equal(model.tensors[fused], want) and model.shards[fused] == 0
            assert not any("q_proj" in n or "gate_proj" in n for n in model.tensors)
            unfused = {n for n in full if not any(p in n for p in ("q_", "k_", "v_", "gate_", "up_"))}
            assert unfused <= set(model.tensors)
            check_rank(model, full, 2, names=unfused)
    rows = daemon.models()
    assert sorted((r.tp_size, r.rank) for r in rows) == [(2, 0), (2, 1)]
    assert sum(r.storage_bytes_read for r in rows) == sum(t.nbytes for t in full.values())


def test_bad_tensor_parallel_requests(daemon, tiny_llama) -> None:
    uri, _ = tiny_llama
    with pytest.raises(client.InvalidRequestError, match=r"'model\.\S+' dim 0 has size \d+, which tp_size 3") as raised:
        client.attach(uri, 0, tp_size=3, target=daemon.target)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(client.InvalidRequestError, match=r"rank must be in \[0, 4\)"):
        client.attach(uri, 4, tp_size=4, target=daemon.target)
    with pytest.raises(client.InvalidRequestError, match="tp_size must be at least 1"):
        client.attach(uri, 0, tp_size=0, target=daemon.target)
    with pytest.raises(client.InvalidRequestError, match="not a valid regex"):
        client.attach(uri, 0, tp_size=2, shard_rules=[client.ShardRule("(", 0)], target=daemon.target)
    with pytest.raises(client.InvalidRequestError, match=r"'q\.proj' is not a module name") as raised:
        client.attach(uri, 0, tp_size=2, fusions=[client.Fusion("qkv", ("q.proj", "k_proj"))], target=daemon.target)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(client.InvalidRequestError, match="'up_proj' is a part of both 'a' and 'b'"):
        client.attach(uri, fusions=[client.Fusion("a", ("gate_proj", "up_proj")), client.Fusion("b", ("up_proj", "x"))],
                      target=daemon.target)
    assert daemon.models() == [] and daemon.segments() == []
    # ...and the daemon keeps serving.
    result = run_client(
        "import json, sys; from weightd import client\n"
        "m = client.attach(sys.argv[1], 1, tp_size=2, target=sys.argv[2]); print(json.dumps(len(m.tensors)))",
        uri, daemon.target,
    )
    assert result > 0


@pytest.mark.parametrize("concurrency", [None, 2], ids=["in-process", "helper"])
# 1 byte: one block per batch, each batch landing before the next. 2 MiB (the model stages about 6 MB, its
# largest block 512 KiB): two 1 MiB slots, a batch streaming into one while the other's blocks scatter.
@pytest.mark.parametrize("memory_limit", [1, 2 << 20], ids=["block-per-batch", "two-slots"])
def test_a_small_staging_buffer_still_loads_every_rank_exactly(
    daemon, tiny_llama, concurrency: int | None, memory_limit: int
) -> None:
    """memory_limit bounds only the staging buffer that scattered blocks pass through.

    With a per-load concurrency the helper process streams, scatters and copies into the daemon's arenas.
    """
    uri, full = tiny_llama
    client.load(uri, tp_size=2, all_ranks=True, memory_limit=memory_limit, concurrency=concurrency,
                target=daemon.target)
    for rank in range(2):
        with client.attach(uri, rank, tp_size=2, target=daemon.target) as model:
            check_rank(model, full, 2)
    assert sum(m.storage_bytes_read for m in daemon.models()) == sum(t.nbytes for t in full.values())


def test_ranks_that_do_not_all_fit_release_every_arena(daemon_factory, s3_server: S3Server, tiny_llama,
                                                       tmp_path: Path) -> None:
    """An all-ranks load reserves its arenas side by side; when one cannot be reserved, none is kept."""
    uri, full = tiny_llama
    model_bytes = sum(t.nbytes for t in full.values())
    shm = tmp_path / "shm"
    # Room for one of two ranks (about half the model each), not for both.
    wrapper = in_own_mount(shm, f"size={model_bytes * 7 // 10}")
    # A budget beyond the tmpfs itself: the filesystem, not the budget, runs out.
    daemon = daemon_factory(s3_server.env(), extra_args=("--shm-dir", str(shm), "--host-memory-limit", "1GiB"),
                            wrapper=wrapper)
    with pytest.raises(client.ResourceExhaustedError, match="evict models"):
        client.load(uri, tp_size=2, all_ranks=True, target=daemon.target)
    assert daemon.models() == []
    # Had the rank that fitted kept its arena, this one would not fit either.
    client.load(uri, tp_size=2, rank=1, target=daemon.target)
    with client.attach(uri, 1, tp_size=2, target=daemon.target) as model:
        check_rank(model, full, 2)
