"""`moe-train generate` and `moe-train eval` end to end.

- eval on a run's validation batches gives the run's last loss/val (fp32 and
  bf16 runs: same batches, same autocast, same device);
- greedy generate gives the tokens transformers' generate gives on the
  exported model, and the tokens of a greedy loop without cache (RoPE,
  ALiBi, expert choice), and the CLI is deterministic at temperature 0;
- bad input is one line and exit 2.
"""
from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from moe_train import cli
from moe_train.config import load_config
from moe_train.data.tokenizer import ByteTokenizer
from moe_train.infer import evaluate, generate
from moe_train.infer.generate import generate_ids
from moe_train.train.checkpoint import save_checkpoint
from moe_train.train.trainer import train
from tests.integration.test_export_hf import randomized_model, tiny_cfg

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "moe.num_experts=4",
        "moe.top_k=2", "model.max_seq_len=64", "train.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=3",
        "train.eval_every=3", "train.eval_iters=2", "train.log_every=1",
        "train.save_every=0", "train.heatmap_every=0"]


def run_main(module, argv):
    out = io.StringIO()
    return module.main(argv, out=out), out.getvalue()


RUNS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"],
        "document_mask": ["data.document_mask=true"]}


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained_run(request, tmp_path_factory):
    extra = []
    if request.param == "document_mask":
        # Short documents (one per line), so the validation rows cross
        # document ends and the mask changes the loss.
        from moe_train.data import prepare

        root = tmp_path_factory.mktemp("docs")
        lines = [f"Line {i}: " + "to be or not to be " * (1 + i % 3) for i in range(300)]
        (root / "docs.txt").write_text("\n".join(lines) + "\n")
        prepare([str(root / "docs.txt")], str(root / "data"), "byte", 0.2, split_lines=True)
        extra = [f"data.dataset={root / 'data'}"]
    cfg = load_config(None, TINY + RUNS[request.param] + extra)
    cfg.train.run_dir = str(tmp_path_factory.mktemp("run"))
    train(cfg)
    return cfg.train.run_dir


def last_val_loss(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r["loss/val"] for r in map(json.loads, fh) if "loss/val" in r][-1]


def test_eval_gives_the_runs_last_val_loss(trained_run):
    rc, out = run_main(evaluate, ["--checkpoint", trained_run, "--json"])
    assert rc == 0
    got = json.loads(out)
    # Same batches, same model, same autocast on the same device: the trainer
    # sums fp32 batch means, eval sums them in float64 (one rounding of 2^-24).
    assert abs(got["loss"] - last_val_loss(trained_run)) < 1e-6
    assert got["tokens"] == 2 * 2 * 32 and got["bytes"] <= got["tokens"]  # EOD is no byte
    if "docs" in json.dumps(got["data"]):
        assert got["bytes"] < got["tokens"]  # the document-masked run crosses document ends
    assert got["bits_per_byte"] == pytest.approx(
        got["loss"] / math.log(2) * got["tokens"] / got["bytes"], rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # generate runs in the run's precision (bf16 autocast: a bf16 KV cache).
    rc, text = run_main(generate, ["--checkpoint", trained_run, "--prompt", "To be",
                                   "--max-new-tokens", "6", "--temperature", "0"])
    assert rc == 0 and text.startswith("To be")


def test_eval_on_a_text_file_predicts_every_token_once(trained_run, tmp_path):
    text = "To be, or not to be, that is the question: " * 3  # 132 bytes: 4 full windows + 3
    path = tmp_path / "t.txt"
    path.write_text(text)
    batches = evaluate.windows(ByteTokenizer().encode_array(text), 32, 2)
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    assert targets.tolist() == list(text.encode())[1:]
    rc, out = run_main(evaluate, ["--checkpoint", trained_run, "--data", str(path), "--json"])
    assert rc == 0 and json.loads(out)["tokens"] == len(text) - 1


def test_eval_on_a_dataset_takes_its_validation_split(trained_run, tmp_path):
    from moe_train.data import load_splits

    rc, out = run_main(evaluate, ["--checkpoint", trained_run, "--data", "shakespeare",
                                  "--max-tokens", "100", "--json"])
    got = json.loads(out)
    assert rc == 0 and got["tokens"] == got["bytes"] == 99 and got["data"] == "shakespeare"
    # The split's first 100 bytes as a text file give the same windows, the same loss.
    _, val, _ = load_splits(load_config(None, TINY).data)
    path = tmp_path / "val100.txt"
    path.write_bytes(bytes(val[0:100].tolist()))
    rc, out = run_main(evaluate, ["--checkpoint", trained_run, "--data", str(path), "--json"])
    assert rc == 0 and json.loads(out)["loss"] == got["loss"]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A checkpoint of a model with O(1) random weights (decisive argmaxes,
    unlike a 3-step model whose logits are nearly flat)."""
    def make(overrides=()):
        cfg = tiny_cfg(["model.vocab_size=384", "model.max_seq_len=48"] + list(overrides))
        model = randomized_model(cfg)
        run_dir = str(tmp_path_factory.mktemp("rand"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        save_checkpoint(run_dir, 1, model, opt, sched, cfg, keep_last=1)
        return model, cfg, run_dir
    return make


@pytest.mark.parametrize("model_type,overrides", [
    ("mixtral", []), ("qwen3_moe", ["model.qk_norm=head", "model.kv_channels=16"])])
def test_greedy_equals_transformers_generate(random_run, tmp_path, model_type, overrides):
    transformers = pytest.importorskip("transformers")
    from moe_train.train.export import export_hf

    model, cfg, run_dir = random_run(overrides)
    prompt = "ROMEO: "
    ids = ByteTokenizer().encode(prompt)
    ours = list(generate_ids(model, ids, 30, temperature=0.0, stop_id=ByteTokenizer.eod_id))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(model, cfg, str(tmp_path / "hf")), local_files_only=True).eval()
    assert hf.config.model_type == model_type
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    # transformers keeps the eos it stopped at (the exported eos is the EOD id); we do not.
    assert ours == [t for t in theirs if t != ByteTokenizer.eod_id]
    assert len(set(ours)) > 3  # not one token repeated: the comparison means something

    # The CLI streams the same text, twice the same at temperature 0.
    argv = ["--checkpoint", run_dir, "--prompt", prompt, "--max-new-tokens", "30",
            "--temperature", "0"]
    first, second = run_main(generate, argv), run_main(generate, argv)
    assert first == second == (0, ByteTokenizer().decode(ids + ours) + "\n")


@pytest.mark.parametrize("overrides", [[], ["model.position_embedding=alibi"],
                                       ["moe.router=expert_choice"]],
                         ids=["rope", "alibi", "expert_choice"])
def test_cached_greedy_equals_a_loop_of_full_forwards(random_run, overrides):
    model, cfg, run_dir = random_run(overrides)
    ids = ByteTokenizer().encode("abc")
    ours = list(generate_ids(model, ids, 45, temperature=0.0))
    assert len(ours) == 45  # 3 + 45 = max_seq_len 48: stops there
    seq = list(ids)
    with torch.no_grad():
        for _ in range(45):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[3:]
    # Sampling runs through the CLI too, and a seed repeats it.
    argv = ["--checkpoint", run_dir, "--prompt", "abc", "--max-new-tokens", "10",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7"]
    assert run_main(generate, argv) == run_main(generate, argv)
    assert run_main(generate, argv)[0] == 0


def test_generation_stops_at_max_seq_len_and_before_the_end_of_document(random_run):
    model, _, _ = random_run()
    free = list(generate_ids(model, [1] * 40, 100, temperature=0.0))
    assert len(free) == 8
    # Pretend the 4th token is the end-of-document id: generation stops before it.
    stop = free[3]
    assert list(generate_ids(model, [1] * 40, 100, temperature=0.0, stop_id=stop)) == \
        free[:free.index(stop)]


@pytest.mark.parametrize("command,extra,message", [
    ("generate", ["--prompt", "x" * 49], "--prompt is 49 tokens; model.max_seq_len is 48"),
    ("generate", ["--prompt", ""], "--prompt is empty"),
    ("generate", ["--prompt", "x", "--top-p", "0"], "--top-p (0.0) must be in (0, 1]"),
    ("generate", ["--prompt", "x", "--temperature", "-1"], "--temperature (-1.0) must be >= 0"),
    ("eval", ["--data", "/nonexistent/file.txt"], "--data /nonexistent/file.txt does not exist"),
    ("eval", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_exit_2(random_run, capsys, command, extra, message):
    _, _, run_dir = random_run()
    assert cli.main([command, "--checkpoint", run_dir] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_checkpoint_path_is_one_line_exit_2(tmp_path, capsys, command):
    argv = [command, "--checkpoint", str(tmp_path / "missing")] + (
        ["--prompt", "x"] if command == "generate" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint path {tmp_path / 'missing'} does not exist\n"
    assert cli.main([command, "--checkpoint", str(tmp_path)] + argv[3:]) == 2
    assert "no checkpoint found in" in capsys.readouterr().err


def test_stream_writes_each_token_and_holds_back_half_characters():
    from moe_train.infer.generate import stream_text

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.pieces = []

        def write(self, s):
            self.pieces.append(s)
            return super().write(s)

    tok = ByteTokenizer()
    out = Recorder()
    new = tok.encode("ab日c")  # 日 is 3 bytes: nothing is written for its first two
    assert stream_text(tok, tok.encode(">"), iter(new), out) == new
    assert out.pieces == [">", "a", "b", "日", "c", "\n"]
