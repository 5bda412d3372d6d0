"""Baselines of `cargo bench --bench train_step`: the same chi2-REBEL step in plain PyTorch,
and TRL's DPOTrainer step, on the batch the Rust bench wrote.

Run by the Rust bench (which passes the batch file); prints one JSON object on its last line.
Both baselines use the .venv torch (the libtorch rebeld links), the same model folder in f32,
the same pairs, right-padded exactly as rebeld pads them, and the same thread count.

TRL is not a dependency of rebeld: it is installed here, pinned, on first use.
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time

import torch

TRL_PIN = "trl==1.16.0"


def chi2_weights(losses, radius):
    """Worst-case weights over the chi-squared ball, in closed form (the pieces walked from
    the largest loss down, as rebeld's `robust::solve_chi2` does)."""
    n = len(losses)
    order = sorted(range(n), key=lambda i: -losses[i])
    desc = [losses[i] for i in order]
    top = desc[0]
    ties = sum(1 for v in desc if v == top)
    if radius >= (n / ties - 1) / 2:
        return [1.0 / ties if v == top else 0.0 for v in losses]
    if radius == 0:
        return [1.0 / n] * n
    threshold = None
    for k in range(1, n + 1):
        denom = (1 + 2 * radius) * k - n
        if denom <= 0:
            continue
        head = desc[:k]
        mu = sum(head) / k
        var = sum((v - mu) ** 2 for v in head) / k
        c = mu - math.sqrt(var) * math.sqrt(n / denom)
        below = desc[k] if k < n else -math.inf
        if below <= c <= desc[k - 1]:
            threshold = c
            break
    if threshold is None:
        return [1.0 / n] * n
    raw = [max(v - threshold, 0.0) for v in losses]
    total = sum(raw)
    return [r / total for r in raw]


class Layout:
    """Both sequences of every pair, A first, right-padded as rebeld's `Batch::new`."""

    def __init__(self, pairs, pad_id):
        seqs = [(p["a_ids"], p["a_prompt_len"]) for p in pairs]
        seqs += [(p["b_ids"], p["b_prompt_len"]) for p in pairs]
        width = max(len(ids) for ids, _ in seqs)
        self.width = width
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        positions, targets, rows = [], [], []
        for row, (seq, prompt_len) in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            for k in range(prompt_len - 1, len(seq) - 1):
                positions.append(row * width + k)
                targets.append(seq[k + 1])
                rows.append(row)
        self.ids, self.mask = ids, mask
        self.positions = torch.tensor(positions)
        self.targets = torch.tensor(targets)
        self.rows = torch.tensor(rows)
        self.n = len(seqs)


def response_sums(model, layout):
    hidden = model.model(input_ids=layout.ids, attention_mask=layout.mask).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.positions)
    logp = torch.log_softmax(model.lm_head(flat).float(), dim=-1)
    picked = logp.gather(1, layout.targets.unsqueeze(1)).squeeze(1)
    return torch.zeros(layout.n, dtype=picked.dtype).index_add(0, layout.rows, picked)


def torch_chi2(model, batch, steps, warmup):
    """rebeld's step on a batch that fits one micro-batch: one pass with gradients, the chi2
    weights from its detached losses, the weighted backward, the global norm and its clip,
    AdamW."""
    pairs, cfg = batch["pairs"], batch["config"]
    layout = Layout(pairs, batch["pad_id"])
    m = len(pairs)
    h_anchor = torch.tensor([p["anchor_a"] - p["anchor_b"] for p in pairs], dtype=torch.float64)
    reward = torch.tensor([p["reward_diff"] for p in pairs], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], eps=1e-8
    )

    def losses():
        s = response_sums(model, layout).double()
        return ((s[:m] - s[m:] - h_anchor) / cfg["eta"] - reward) ** 2

    seconds, first_losses = [], None
    for step in range(warmup + steps):
        started = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        current = losses()
        values = current.detach().tolist()
        first_losses = first_losses or values
        q = torch.tensor(chi2_weights(values, cfg["radius"]), dtype=torch.float64)
        (current * q).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"] or math.inf)
        if not math.isfinite(float(norm)):
            raise RuntimeError("non-finite gradient")
        opt.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    return {
        "seconds": seconds,
        "padded_tokens": layout.n * layout.width,
        "first_losses": first_losses,
    }


def ensure_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        pins = [TRL_PIN, f"torch=={torch.__version__.split('+')[0]}"]
        import transformers

        pins.append(f"transformers=={transformers.__version__}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins], check=True)
    import trl

    return trl.__version__


def trl_dpo(model, tokenizer, batch, steps, warmup):
    """TRL's DPOTrainer.training_step (concatenated forward of both responses, DPO loss against
    reference log-probs given in the batch, backward), then the clip and AdamW step that
    Trainer's loop runs after it."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs, cfg = batch["pairs"], batch["config"]
    examples = [
        {
            "prompt_ids": p["a_ids"][: p["a_prompt_len"]],
            "chosen_ids": p["a_ids"][p["a_prompt_len"] :],
            "rejected_ids": p["b_ids"][p["b_prompt_len"] :],
            "ref_chosen_logps": p["anchor_a"],
            "ref_rejected_logps": p["anchor_b"],
        }
        for p in pairs
    ]
    text = Dataset.from_list(
        [{"prompt": "a", "chosen": " b", "rejected": " c"} for _ in range(len(pairs))]
    )
    args = DPOConfig(
        output_dir=batch["scratch"],
        per_device_train_batch_size=len(pairs),
        learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        beta=0.1,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        save_strategy="no",
        logging_strategy="no",
        padding_free=False,
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=text, processing_class=tokenizer
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=warmup + steps)
    # Set by Trainer's own loop before its first training_step.
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer.data_collator(examples)
    tokens = int(inputs["attention_mask"].sum())
    padded = int(inputs["input_ids"].numel())
    seconds = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg["max_grad_norm"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=False)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    shutil.rmtree(batch["scratch"], ignore_errors=True)
    return {"seconds": seconds, "tokens": tokens, "padded_tokens": padded}


def load(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    return model


def profiled(label, step):
    """Runs `step` under torch's profiler and prints its operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"--- profile: {label}\n{table}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more step of each baseline and print the operators "
        "by self CPU time to stderr",
    )
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    with open(opts.batch) as f:
        batch = json.load(f)

    result = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}
    model = load(batch["model_dir"])
    result["torch"] = torch_chi2(model, batch, opts.steps, opts.warmup)
    if opts.profile:
        profiled("PyTorch chi2-REBEL step", lambda: torch_chi2(model, batch, 1, 0))
    if not opts.skip_trl:
        try:
            from transformers import AutoTokenizer

            result["trl_version"] = ensure_trl()
            tokenizer = AutoTokenizer.from_pretrained(batch["model_dir"])
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load(batch["model_dir"])
            result["trl"] = trl_dpo(model, tokenizer, batch, opts.steps, opts.warmup)
            if opts.profile:
                profiled(
                    "TRL DPOTrainer step", lambda: trl_dpo(model, tokenizer, batch, 1, 0)
                )
        except Exception as error:  # reported in the table instead of a number
            result["trl"] = {"error": f"{type(error).__name__}: {error}"}
    for name in ("torch", "trl"):
        if "seconds" in result.get(name, {}):
            result[name]["median_s"] = statistics.median(result[name]["seconds"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
