"""Tensor parallelism on CPUs: two gloo ranks (tests/tp_worker.py, started as torchrun would)
against one rank on the same HF checkpoints (MHA; GQA with 2 KV heads split over the ranks; 1 KV
head replicated on both), a rank killed or hung mid-step, and the torchrun bench launch."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams

transformers = pytest.importorskip("transformers")

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from tp_worker import HEAD_ROWS, trace  # noqa: E402

CONFIGS = {  # vocab 301: the two vocabulary shards are 151 rows, the last one padded
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160),
    "gqa2": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=200),
    "kv1": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96),
}


def _save(path, kind):
    torch.manual_seed(len(kind))
    config = transformers.LlamaConfig(vocab_size=301, num_hidden_layers=3, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, **CONFIGS[kind])
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than HF's init, so greedy paths are decisive
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {kind: _save(root / kind, kind) for kind in CONFIGS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(procs) -> None:
    """By pid, the processes and everything they started (torchrun's workers sit in their own sessions)."""
    pids = [p.pid for p in procs]
    pids += [d for pid in pids for d in _descendants(pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def _ranks(scenario, out, timeout_s, paths):
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(HERE / "tp_worker.py"), scenario, str(out), str(timeout_s), *paths],
                             env=_env(port, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            for r in range(2)]


def _wait(proc, seconds):
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"rank did not exit within {seconds} s: {proc.communicate()[0].decode(errors='replace')[-2000:]}")


def _traces(scenario, tmp_path, paths) -> list:
    """Rank 0's trace of each checkpoint, from two ranks that both exit cleanly."""
    out = tmp_path / "trace.json"
    procs = _ranks(scenario, out, 60, paths)
    try:
        codes = [_wait(p, 120) for p in procs]
        logs = [p.stdout.read().decode(errors="replace")[-3000:] for p in procs]
    finally:
        _kill(procs)
    assert codes == [0, 0], logs
    return json.loads(out.read_text())


def test_two_ranks_match_one_rank(checkpoints, tmp_path):
    results = _traces("compare", tmp_path, list(checkpoints.values()))
    for (kind, path), two in zip(checkpoints.items(), results):
        one = trace(Engine(path, device="cpu", dtype=torch.float32))
        assert two["generate"] == one["generate"], kind
        assert two["serve"] == one["serve"], kind
        reasons = {e[1]: e[4] for e in one["serve"] if e[3]}
        assert "abort" in reasons.values() and reasons["beam"] == "length" and reasons["late"] == "length"
        ref, got = torch.tensor(one["logits"]), torch.tensor(two["logits"])
        assert ref.abs().max() > 1
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), kind  # relative to the logits' scale
        for (first, count), ref_rows, got_rows in zip(HEAD_ROWS, one["head"], two["head"]):
            ref_rows, got_rows = torch.tensor(ref_rows), torch.tensor(got_rows)
            legal = torch.zeros(301, dtype=torch.bool)
            legal[first:first + count] = True
            assert torch.isfinite(got_rows).equal(legal.expand_as(got_rows)), (kind, first, count)
            assert (got_rows[:, legal] - ref_rows[:, legal]).abs().max() <= 1e-4 * ref_rows[:, legal].abs().max()


def test_a_preset_draws_the_same_random_weights_at_any_size(tmp_path):
    """Without a checkpoint each rank takes its slices of the weights one rank draws from the
    seed, so the tiny preset generates the same tokens on two ranks as on one."""
    (two,) = _traces("compare", tmp_path, ["tiny"])
    one = trace(Engine("tiny", device="cpu", dtype=torch.float32))
    assert two["generate"] == one["generate"] and two["serve"] == one["serve"]
    ref, got = torch.tensor(one["logits"]), torch.tensor(two["logits"])
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_two_ranks_replaying_decode_graphs_match_one_rank(checkpoints, tmp_path):
    """Decode steps from captured graphs (CUDA graphs stood in for on the CPU): both ranks capture
    in lockstep, rank 0 publishes each replay's inputs and both replay their own graph; tokens
    equal one eager rank's through aborts, a late arrival and beam forks."""
    (two,) = _traces("graphs", tmp_path, [checkpoints["gqa2"]])
    one = trace(Engine(checkpoints["gqa2"], device="cpu", dtype=torch.float32))
    assert two["generate"] == one["generate"] and two["serve"] == one["serve"]
    assert [4, 8] in two["graphs_used"] and [1, 8] in two["graphs_used"]  # every decode step was a replay


@pytest.mark.parametrize("scenario", ["kill", "hang", "badload"])
def test_a_failed_rank_ends_the_other_naming_it(checkpoints, tmp_path, scenario):
    out = tmp_path / "error.json"
    timeout_s = 3
    procs = _ranks(scenario, out, timeout_s, [checkpoints["gqa2"]])
    try:
        start = time.monotonic()
        code = _wait(procs[0], 60)
        elapsed = time.monotonic() - start
        if scenario != "hang":
            assert procs[1].wait(timeout=5) == (-signal.SIGKILL if scenario == "kill" else 1)
    finally:
        _kill(procs)
    assert code == 3, procs[0].stdout.read().decode(errors="replace")[-3000:]
    error = json.loads(out.read_text())["error"]
    if scenario != "hang":
        assert f"rank 1 (pid {procs[1].pid} on {socket.gethostname()}) exited" in error
    else:
        assert "rank 1 hung" in error and f"{timeout_s * 1000}ms" in error
    assert elapsed < 45


def test_torchrun_bench():
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "anygpt_engine", "bench", "--tensor-parallel-size", "2",
           "--model", "tiny", "--prompt-len", "9", "--new-tokens", "5", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun bench did not finish within 120 s")
    finally:
        _kill([proc])
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    report = stdout.decode()
    assert report.count("decode_tok_s") == 1  # rank 0 reports, rank 1 follows
    rows = dict(line.split(None, 1) for line in report.splitlines() if line.strip())
    assert rows["tensor_parallel_size"].strip() == "2" and float(rows["decode_tok_s"]) > 0
    assert float(rows["all_reduce_us"]) > 0


def test_tensor_parallel_size_checks():
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"tensor_parallel_size={bad!r}, expected a positive int"):
            Engine("tiny", device="cpu", tensor_parallel_size=bad)
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 needs a torch.distributed process group"):
        Engine("tiny", device="cpu", tensor_parallel_size=2)
    from anygpt_engine.models.tensor_parallel import Shard

    config = ModelConfig(vocab_size=301, hidden_size=96, num_layers=1, num_heads=6, num_kv_heads=2,
                         intermediate_size=200)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide num_heads=6"):
        Shard(config, 0, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 and num_kv_heads=2: one must divide the other"):
        Shard(config.replace(num_heads=12, hidden_size=192, intermediate_size=300), 0, 3)


def test_shard_slices_cover_the_model_once():
    """Every query head, FFN row and vocabulary row on exactly one rank; KV heads split, or
    replicated where the ranks outnumber them (each rank holding the head its queries use)."""
    from anygpt_engine.models.tensor_parallel import Shard

    for heads, kv_heads, ranks in [(8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 1, 8), (6, 2, 2)]:
        config = ModelConfig(vocab_size=53, hidden_size=16 * heads, num_layers=1, num_heads=heads,
                             num_kv_heads=kv_heads, intermediate_size=24 * ranks, head_dim=16)
        shards = [Shard(config, r, ranks) for r in range(ranks)]
        d, group = 16, heads // kv_heads
        q = [s.hf_slice("model.layers.0.self_attn.q_proj.weight")[0] for s in shards]
        assert [r for a, b in q for r in range(a, b)] == list(range(heads * d))
        for s, (a, b) in zip(shards, q):
            k0, k1 = s.hf_slice("model.layers.0.self_attn.k_proj.weight")[0]
            assert {h // group for h in range(a // d, b // d)} == set(range(k0 // d, k1 // d))
        vocab = [s.hf_slice("lm_head.weight")[0] for s in shards]
        assert [r for a, b in vocab for r in range(a, b)] == list(range(53))
        assert all(s.rows_per_rank == math.ceil(53 / ranks) for s in shards)


def test_sharded_tensors_slice_the_safetensors_file(checkpoints):
    """Each rank's part, read with get_slice, equals the same rows/columns of the whole tensor;
    the vocabulary's last shard is zero-padded to ceil(V / N) rows."""
    from anygpt_engine.models.tensor_parallel import Shard, sharded_tensors
    from anygpt_engine.weights import iter_checkpoint

    path = checkpoints["kv1"]
    whole = dict(iter_checkpoint(path))
    config = ModelConfig.from_pretrained(path)
    for rank in range(2):
        shard = Shard(config, rank, 2)
        parts = dict(sharded_tensors(path, shard))
        assert parts.keys() == whole.keys()
        assert parts["model.layers.1.self_attn.k_proj.weight"].equal(whole["model.layers.1.self_attn.k_proj.weight"])
        q = whole["model.layers.0.self_attn.q_proj.weight"]
        assert parts["model.layers.0.self_attn.q_proj.weight"].equal(q[rank * 32:(rank + 1) * 32])
        o = whole["model.layers.2.self_attn.o_proj.weight"]
        assert parts["model.layers.2.self_attn.o_proj.weight"].equal(o[:, rank * 32:(rank + 1) * 32])
        down = whole["model.layers.0.mlp.down_proj.weight"]
        assert parts["model.layers.0.mlp.down_proj.weight"].equal(down[:, rank * 48:(rank + 1) * 48])
        head = parts["lm_head.weight"]
        assert head.shape == (151, 64)
        rows = whole["lm_head.weight"][rank * 151:(rank + 1) * 151]
        assert head[:len(rows)].equal(rows) and not head[len(rows):].any()
        assert parts["model.norm.weight"].equal(whole["model.norm.weight"])


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun started."""
    ranks = {}
    for pid in _descendants(launcher_pid):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if
                       "=" in kv)
        except OSError:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def _completion(base: str, prompt: list[int], max_tokens: int, stream: bool = False):
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True, "stream": stream}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


@pytest.fixture()
def tp_server(checkpoints, tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m anygpt_engine serve --tensor-parallel-size 2` on the GQA
    checkpoint (2 KV heads, one per rank)."""
    from serving_app import ServerProcess, free_port

    for key, value in _env(0).items():
        if key != "MASTER_PORT":
            monkeypatch.setenv(key, value)
    port = free_port()
    proc = ServerProcess(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(_free_port()), "-m", "anygpt_engine", "serve",
                          "--tensor-parallel-size", "2", "--model", checkpoints["gqa2"], "--port", str(port),
                          "--served-model-name", "m", "--num-blocks", "64", "--max-batch-size", "4"],
                         port, tmp_path / "server.log", timeout=120)
    try:
        yield proc
    finally:
        _kill([proc.process])
        proc._log_file.close()


def test_torchrun_serve_gives_one_rank_tokens_and_stops_cleanly(checkpoints, tp_server):
    """Rank 0 serves HTTP while rank 1 follows: greedy completions equal one rank's, a client that
    drops its stream mid-way (an abort) leaves the next request exact, and SIGTERM to torchrun
    drains rank 0, whose STOP releases rank 1 (which ignores the signal): no rank fails."""
    one = Engine(checkpoints["gqa2"], device="cpu", dtype=torch.float32)
    prompts = [[1, 17, 99, 250, 3], list(range(5, 60))]
    expected = one.generate(prompts, SamplingParams.greedy(7))
    with _completion(tp_server.base, prompts[0], 7) as r:
        assert json.loads(r.read())["choices"][0]["token_ids"] == expected[0]
    with _completion(tp_server.base, prompts[1], 40, stream=True) as r:
        r.readline()  # the first event, then the client goes away
    with _completion(tp_server.base, prompts[1], 7) as r:
        assert json.loads(r.read())["choices"][0]["token_ids"] == expected[1]
    ranks = _rank_pids(tp_server.process.pid)
    assert sorted(ranks) == [0, 1]
    tp_server.process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks (and then exits 1 itself)
    _wait(tp_server.process, 60)
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values())
    log = tp_server.log.read_text()
    assert "serve: error" not in log and "SIGKILL" not in log, log[-3000:]  # no rank failed or had to be killed


def test_torchrun_serve_exits_naming_a_lost_rank(tp_server):
    """A follower killed while the server idles: the next request's step fails on rank 0, the
    request gets an error, and the server exits (torchrun non-zero) naming rank 1."""
    ranks = _rank_pids(tp_server.process.pid)
    os.kill(ranks[1], signal.SIGKILL)
    try:
        with _completion(tp_server.base, [1, 2, 3], 5) as r:
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, ConnectionError):
        status = None  # the server went down before it answered
    assert status != 200
    assert _wait(tp_server.process, 60) != 0
    log = tp_server.log.read_text()
    assert f"rank 1 (pid {ranks[1]} on {socket.gethostname()}) exited" in log, log[-3000:]
