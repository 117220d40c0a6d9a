"""Character-level Penn Treebank language model (the paper's Sec. 4.2): embedding → (Hyper)LSTM → softmax.

    python -m hyperfused.train charlm --model ln-hyperlstm --hidden 256 --hyper-size 64 --steps 2000
    python -m hyperfused.train charlm --preset paper --model hyperlstm   # the paper's Table 2 configuration
    python -m hyperfused.train charlm --sample 200 --checkpoint ck.pt --temperature 0.8   # generate text
    torchrun --nproc_per_node=2 -m hyperfused.train charlm --steps 100      # data-parallel (gloo / nccl)

Truncated BPTT carries the whole state (main and hyper) across batches. Checkpoints (--checkpoint PATH,
every --checkpoint-every steps and at the end) are written atomically with a checksum
(hyperfused.train.checkpoint) and hold the model, the optimiser, the RNG states, the carried state and the
data position, so that --resume reaches exactly the parameters of a run that was never interrupted. A run
whose loss or weights become non-finite stops with an error before it writes another checkpoint.

--log FILE.csv (or .json) records the learning curve: train bpc every step, valid bpc every --eval-every
steps, wall time; `python -m hyperfused.train plot` draws several runs' curves and tabulates them. With
--patience N a run stops once N validations in a row have not improved on the best, and the final valid
and test bpc are those of the best validated parameters.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..models import LayerNormLSTM
from ..nn import HyperLSTM, HyperLSTMState
from . import checkpoint as checkpoint_io
from .data import MissingDataError, load_ptb_chars
from .determinism import deterministic_algorithms

MODELS = ("lstm", "ln-lstm", "hyperlstm", "ln-hyperlstm")

# The paper's character-level Penn Treebank configuration (Ha, Dai & Le 2016, Sec. 4.2 and Appendix A.3.1):
# H = 1000 main units, Ĥ = 128 hyper units, embedding size N_z = 4 (16 for "large embeddings"); Adam at a
# learning rate of 0.001, gradient clipping at 1.0, minibatches of 128 sequences of 100 characters; recurrent
# dropout with keep probability 0.9, and dropout on the input and output layers (no separate rate is given:
# the same 0.1 is assumed). The paper trains until validation stops improving and does not state its rule:
# validation once per epoch (~400 steps) and a patience of 5 validations are this project's choice.
PAPER = dict(hidden=1000, hyper_size=128, hyper_embed=4, batch_size=128, seq_len=100, lr=1e-3, clip=1.0,
             recurrent_dropout=0.1, dropout=0.1, epochs=100.0, eval_every=400, patience=5)
PRESETS = {"paper": PAPER, "paper-large-embedding": dict(PAPER, hyper_embed=16)}


class CharLM(nn.Module):
    def __init__(self, model: str, vocab: int, embed: int, hidden: int, layers: int, hyper_size: int,
                 hyper_embed: int, dropout: float, recurrent_dropout: float, backend: str, scale_init: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        if model == "lstm":
            self.rnn = nn.LSTM(embed, hidden, layers)
        elif model == "ln-lstm":
            self.rnn = LayerNormLSTM(embed, hidden, layers, recurrent_dropout=recurrent_dropout)
        else:
            self.rnn = HyperLSTM(embed, hidden, layers, hyper_size=hyper_size, hyper_embed=hyper_embed,
                                 layer_norm=model == "ln-hyperlstm", recurrent_dropout=recurrent_dropout,
                                 scale_init=scale_init, backend=backend)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):
        h, state = self.rnn(self.drop(self.embed(ids)), state)
        return self.out(self.drop(h)), state


def detach_state(state):
    if isinstance(state, HyperLSTMState):
        return state.detach()
    return tuple(t.detach() for t in state)


def streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(n, batch): `batch` contiguous streams read in parallel, one column each."""
    n = len(ids) // batch
    return ids[:n * batch].view(batch, n).t().contiguous()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int) -> float:
    """Bits per character over `data` (n, B), state carried across chunks."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    for i in range(0, data.shape[0] - 1, seq_len):
        x, y = data[i:i + seq_len], data[i + 1:i + 1 + seq_len]
        x = x[:len(y)]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count / math.log(2)


# Options that fix the model or the data layout: a resumed run must use the checkpoint's. Every other option
# applies from the resumed step on (--lr included: it overrides the learning rate in the optimiser state).
RESUME_MUST_MATCH = ("model", "hidden", "hyper_size", "hyper_embed", "embed", "layers", "seq_len", "batch_size",
                     "train_limit")


def _check_resume_args(path: str, stored: dict, args) -> list[str]:
    """Refuses options that would break exact resumption; returns notes on the other options that changed."""
    wrong = [f"--{k.replace('_', '-')} {stored.get(k)!r} (this run: {getattr(args, k)!r})"
             for k in RESUME_MUST_MATCH if stored.get(k) != getattr(args, k)]
    if wrong:
        raise SystemExit(f"error: {path} was written with {', '.join(wrong)}; these options fix the model and the "
                         "data layout and must match to resume")
    ignore = {"resume", "checkpoint", "quiet", "log", "save_final", "steps", "epochs", "preset", "scale_init"}
    return [f"note: resuming with --{k.replace('_', '-')} {v!r} (the checkpoint has {stored.get(k)!r}): applied from "
            f"step {{step}} on" for k, v in sorted(vars(args).items())
            if k not in ignore and k not in RESUME_MUST_MATCH and k in stored and stored[k] != v]


def _first_non_finite(model, loss_bpc: float = 0.0, weights: bool = False):
    """What went non-finite: the loss (checked every step), else with `weights` a parameter (one reduction and
    one sync, before each checkpoint); None when all is finite."""
    if not math.isfinite(loss_bpc):
        return "the loss"
    if weights:
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
        if not finite.all():
            return f"parameter {[n for n, _ in model.named_parameters()][int((~finite).nonzero()[0])]}"
    return None


def _stop_if_diverged(bad, step: int, args) -> None:
    """Stops a diverged run with a non-zero exit before it writes anything, so the last good checkpoint stays."""
    if bad is not None:
        kept = f"; the last good checkpoint {args.checkpoint} is kept" if args.checkpoint else ""
        raise SystemExit(f"error: training diverged at step {step}: {bad} is not finite{kept}. Try a lower --lr "
                         "or a --clip")


def parse_args(argv=None):
    ap = _parser()
    preset = ap.parse_known_args(argv)[0].preset
    if preset is not None:
        ap.set_defaults(**PRESETS[preset])  # options given on the command line still win
    args = ap.parse_args(argv)
    if args.patience is not None and (args.patience < 1 or args.eval_every < 1):
        raise SystemExit(f"error: --patience: expected a positive number of validations with --eval-every > 0, got "
                         f"--patience {args.patience} --eval-every {args.eval_every}")
    return args


def _parser():
    ap = argparse.ArgumentParser(prog="python -m hyperfused.train charlm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="the paper's configuration (H=1000, Ĥ=128, N_z=4 or 16, batch 128 × 100, Adam 1e-3, clip 1, "
                         "dropout 0.1, validation-based stopping); other options override it")
    ap.add_argument("--model", choices=MODELS, default="ln-hyperlstm")
    ap.add_argument("--hidden", type=int, default=1000)
    ap.add_argument("--hyper-size", type=int, default=128)
    ap.add_argument("--hyper-embed", type=int, default=4)
    ap.add_argument("--embed", type=int, default=128, help="character embedding size")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128, help="streams per process")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout on the RNN's input and output")
    ap.add_argument("--recurrent-dropout", type=float, default=0.1, help="1 - keep probability (paper: keep 0.9)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps in total (default: --epochs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N training characters")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N characters")
    ap.add_argument("--eval-every", type=int, default=0, help="validation bpc every N steps (0: at the end)")
    ap.add_argument("--patience", type=int, default=None,
                    help="stop after N validations without a new best; report the best validated parameters")
    ap.add_argument("--scale-init", type=float, default=0.1,
                    help="hyper models: where every scaling vector d starts (paper: 0.1; 1.0 starts as a plain LSTM)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint path")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="continue from --checkpoint; --model, --hidden, --hyper-size, --hyper-embed, --embed, --layers, "
                         "--seq-len, --batch-size and --train-limit must match it (they fix the model and the data "
                         "layout); other options, --lr included, apply from the resumed step on")
    ap.add_argument("--log", default=None, help="learning curve: .csv or .json")
    ap.add_argument("--save-final", default=None, help="final state_dict path; '{rank}' is replaced per process")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) for the run: on the CPU no GEMM library is measured "
                         "(training's products run at::mm), so a run resumed in another process continues bit for bit")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--sample", type=int, default=None, metavar="N",
                    help="instead of training: print N characters generated by the model in --checkpoint")
    ap.add_argument("--temperature", type=float, default=1.0, help="with --sample: softmax temperature (> 0)")
    ap.add_argument("--prompt", default="the ", help="with --sample: the text the generated characters continue")
    return ap


def train(args):
    if not args.deterministic:
        return _train(args)
    if args.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode asks for it
    with deterministic_algorithms():
        return _train(args)


@dataclass
class _Processes:
    """This process's place among the data-parallel ones (torchrun sets WORLD_SIZE)."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class _Progress:
    """What a checkpoint keeps besides the model and the optimiser, so that a resumed run continues exactly."""
    step: int = 0
    state: object = None  # the detached state carried into the next chunk (None: a zero state)
    history: list = field(default_factory=list)
    best: Optional[dict] = None  # with --patience: dict(valid_bpc, step, model) of the best validated parameters


def _train(args):
    procs = _start_processes(args)
    quiet = args.quiet or procs.rank != 0
    train_text, valid_text, test_text = load_ptb_chars()
    vocab = sorted(set(train_text))
    index = {ch: i for i, ch in enumerate(vocab)}
    encode = lambda s: torch.tensor([index[ch] for ch in s], dtype=torch.long)  # noqa: E731
    train_data, chunks = _train_streams(args, train_text, encode, procs)
    steps = args.steps if args.steps is not None else max(1, int(args.epochs * chunks))
    model, net, opt = _model_and_optimizer(args, len(vocab), procs)
    run = _resume(args, model, opt, procs, quiet) if args.resume else _Progress()
    valid_data = _eval_data(valid_text, encode, args, procs.device) if procs.rank == 0 else None

    bar = tqdm(total=steps, initial=run.step, desc=f"charlm {args.model}", disable=quiet)
    running = None
    clock = time.perf_counter() - (run.history[-1].get("elapsed_s", 0.0) if run.history else 0.0)
    model.train()
    while run.step < steps and not _out_of_patience(run.history, run.best, args.patience):
        j = run.step % chunks
        if j == 0:
            run.state = None  # a new pass over the data starts from a zero state
        x = train_data[j * args.seq_len:(j + 1) * args.seq_len]
        y = train_data[j * args.seq_len + 1:(j + 1) * args.seq_len + 1]
        bpc = _train_step(args, net, model, opt, x, y, run)
        running = bpc if running is None else 0.98 * running + 0.02 * bpc
        record = dict(step=run.step, train_bpc=bpc)
        if args.eval_every and run.step % args.eval_every == 0 and procs.rank == 0:
            _validate(args, model, valid_data, run, record)
        record["elapsed_s"] = time.perf_counter() - clock
        run.history.append(record)
        shown = {"valid": f"{record['valid_bpc']:.3f}"} if "valid_bpc" in record else {}
        bar.set_postfix(bpc=f"{running:.3f}", **shown)
        bar.update()
        if _periodic_checkpoint_due(args, run.step):
            _save_checkpoint(args, model, opt, procs, run)
    bar.close()
    if args.checkpoint and run.step > 0 and not _periodic_checkpoint_due(args, run.step):
        _save_checkpoint(args, model, opt, procs, run)  # the end of the run, between periodic checkpoints

    if run.best is not None and run.best["step"] != run.step:
        model.load_state_dict(run.best["model"])  # the final numbers are those of the best validated parameters
    result = _summary(args, model, procs, run)
    if procs.rank == 0:
        result["valid_bpc"] = evaluate(model, valid_data, args.seq_len)
        result["test_bpc"] = evaluate(model, _eval_data(test_text, encode, args, procs.device), args.seq_len)
        if args.log:
            _write_log(args.log, run.history, result)
    if args.save_final:
        torch.save(model.state_dict(), args.save_final.replace("{rank}", str(procs.rank)))
    if procs.distributed:
        dist.destroy_process_group()
    return result, run.history


def _start_processes(args) -> _Processes:
    """One process, or joins torchrun's group (gloo on the CPU, nccl on CUDA, one GPU per local rank)."""
    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Processes(device)
    if args.patience is not None:
        raise SystemExit("error: --patience needs a single process (only rank 0 validates)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return _Processes(device, dist.get_rank(), dist.get_world_size())


def _train_streams(args, train_text: str, encode, procs: _Processes):
    """This process's training streams, (n, batch) on its device, and how many --seq-len chunks they hold."""
    if args.train_limit:
        train_text = train_text[:args.train_limit]
    shard = len(train_text) // procs.world  # each rank reads its own contiguous shard
    data = streams(encode(train_text[procs.rank * shard:(procs.rank + 1) * shard]), args.batch_size)
    chunks = (data.shape[0] - 1) // args.seq_len
    if chunks < 1:
        raise SystemExit(f"error: too little training text for --batch-size {args.batch_size} and --seq-len "
                         f"{args.seq_len} on {procs.world} process(es)")
    return data.to(procs.device), chunks


def _model_and_optimizer(args, vocab_size: int, procs: _Processes):
    """(model, what the step calls: the model or its DistributedDataParallel wrapper, Adam)."""
    torch.manual_seed(args.seed)  # the same initial parameters on every rank
    model = CharLM(args.model, vocab_size, args.embed, args.hidden, args.layers, args.hyper_size, args.hyper_embed,
                   args.dropout, args.recurrent_dropout, args.backend, args.scale_init).to(procs.device)
    torch.manual_seed(args.seed + 1000 * procs.rank)  # dropout masks differ between ranks
    net = model
    if procs.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    return model, net, torch.optim.Adam(model.parameters(), lr=args.lr)


def _resume(args, model, opt, procs: _Processes, quiet: bool) -> _Progress:
    """Loads --checkpoint into the model and the optimiser, restores this rank's RNG states; its progress."""
    if not args.checkpoint or not os.path.exists(args.checkpoint):
        raise SystemExit(f"error: --resume needs an existing --checkpoint, got {args.checkpoint!r}")
    try:
        ck = checkpoint_io.load(args.checkpoint, map_location=procs.device)
    except checkpoint_io.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    if not isinstance(ck, dict) or not {"step", "model", "optimizer", "ranks", "history", "args"} <= ck.keys():
        raise SystemExit(f"error: {args.checkpoint} is not a charlm training checkpoint")
    notes = _check_resume_args(args.checkpoint, ck["args"], args)
    if len(ck["ranks"]) != procs.world:
        raise SystemExit(f"error: {args.checkpoint} was written by {len(ck['ranks'])} process(es); resume it "
                         f"with the same number (this run has {procs.world})")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    for group in opt.param_groups:
        group["lr"] = args.lr
    run = _Progress(ck["step"], None, ck["history"], ck.get("best"))
    for note in notes if not quiet else []:
        print(note.format(step=run.step))
    mine = ck["ranks"][procs.rank]
    torch.set_rng_state(mine["rng"])
    if procs.device.type == "cuda" and mine["cuda_rng"] is not None:
        torch.cuda.set_rng_state(mine["cuda_rng"], procs.device)
    if mine["state"] is not None:
        state = [t.to(procs.device) for t in mine["state"]]
        run.state = HyperLSTMState(*state) if len(state) == 4 else tuple(state)
    return run


def _periodic_checkpoint_due(args, step: int) -> bool:
    """Whether `step` ends with a periodic checkpoint (--checkpoint with --checkpoint-every)."""
    return bool(args.checkpoint and args.checkpoint_every and step % args.checkpoint_every == 0)


def _save_checkpoint(args, model, opt, procs: _Processes, run: _Progress) -> None:
    """Rank 0 writes the model, the optimiser, every rank's RNG states and carried state, and the progress."""
    _stop_if_diverged(_first_non_finite(model, weights=True), run.step, args)
    state = None
    if run.state is not None:
        state = list(run.state.tensors() if isinstance(run.state, HyperLSTMState) else run.state)
    mine = dict(rng=torch.get_rng_state(), state=state,
                cuda_rng=torch.cuda.get_rng_state(procs.device) if procs.device.type == "cuda" else None)
    ranks = [mine]
    if procs.distributed:
        ranks = [None] * procs.world
        dist.all_gather_object(ranks, {k: (v.cpu() if isinstance(v, torch.Tensor) else
                                          [t.cpu() for t in v] if isinstance(v, list) else v)
                                       for k, v in mine.items()})
    if procs.rank == 0:
        checkpoint_io.save(dict(step=run.step, model=model.state_dict(), optimizer=opt.state_dict(), ranks=ranks,
                                history=run.history, args=vars(args), best=run.best), args.checkpoint)


def _train_step(args, net, model, opt, x, y, run: _Progress) -> float:
    """One optimiser step on the chunk (x, y), carrying the state; the chunk's bits per character."""
    logits, state = net(x, run.state)
    run.state = detach_state(state)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    run.step += 1
    bpc = loss.item() / math.log(2)
    _stop_if_diverged(_first_non_finite(model, bpc), run.step, args)
    return bpc


def _validate(args, model, valid_data, run: _Progress, record: dict) -> None:
    """Validation bpc into `record`; with --patience, keeps a copy of the best validated parameters."""
    record["valid_bpc"] = evaluate(model, valid_data, args.seq_len)
    if args.patience is not None and (run.best is None or record["valid_bpc"] < run.best["valid_bpc"]):
        run.best = dict(valid_bpc=record["valid_bpc"], step=run.step,
                        model={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})


def _summary(args, model, procs: _Processes, run: _Progress) -> dict:
    """The run's configuration and where its training loss ended (rank 0 adds valid and test bpc)."""
    history = run.history
    last50 = history[-50:]
    return dict(model=args.model, steps=run.step, world_size=procs.world,
                best_step=run.best["step"] if run.best else None, seed=args.seed, scale_init=args.scale_init,
                lr=args.lr, hidden=args.hidden, recurrent_dropout=args.recurrent_dropout, dropout=args.dropout,
                clip=args.clip, hyper_size=args.hyper_size, hyper_embed=args.hyper_embed,
                batch_size=args.batch_size, seq_len=args.seq_len,
                elapsed_s=history[-1]["elapsed_s"] if history else 0.0,
                parameters=sum(p.numel() for p in model.parameters()),
                train_bpc_last=history[-1]["train_bpc"] if history else None,
                train_bpc_last50=sum(h["train_bpc"] for h in last50) / len(last50) if history else None)


def _out_of_patience(history, best, patience) -> bool:
    """True once `patience` validations in a row came after the best one without beating it."""
    if patience is None or best is None:
        return False
    return sum(1 for h in history if "valid_bpc" in h and h["step"] > best["step"]) >= patience


def _eval_data(text, encode, args, device):
    if args.eval_limit:
        text = text[:args.eval_limit]
    return streams(encode(text), min(args.batch_size, 32)).to(device)


def _write_log(path, history, result):
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "train_bpc", "valid_bpc", "elapsed_s"])
            w.writeheader()
            w.writerows(history)
    else:
        with open(path, "w") as f:
            json.dump(dict(result=result, history=history), f)


@torch.no_grad()
def sample(args) -> str:
    """The prompt and args.sample characters drawn one at a time from the model in args.checkpoint; the state
    (main and hyper) carries from character to character."""
    if args.sample <= 0:
        raise SystemExit(f"error: --sample: expected a positive number of characters, got {args.sample}")
    if not args.temperature > 0:
        raise SystemExit(f"error: --temperature: expected a positive number, got {args.temperature}")
    if not args.checkpoint:
        raise SystemExit("error: --sample needs --checkpoint PATH (a file that --checkpoint wrote while training)")
    try:
        ck = checkpoint_io.load(args.checkpoint, map_location="cpu")
    except checkpoint_io.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    vocab = sorted(set(load_ptb_chars()[0]))
    unknown = sorted(set(args.prompt) - set(vocab))
    if not args.prompt or unknown:
        raise SystemExit(f"error: --prompt: expected non-empty text of Penn Treebank characters; {unknown} are not "
                         "among them")
    a = ck["args"]
    device = torch.device(args.device)
    model = CharLM(a["model"], len(vocab), a["embed"], a["hidden"], a["layers"], a["hyper_size"], a["hyper_embed"],
                   a["dropout"], a["recurrent_dropout"], args.backend).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    index = {ch: i for i, ch in enumerate(vocab)}
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.tensor([[index[ch]] for ch in args.prompt], device=device)
    logits, state = model(ids)
    out = []
    for _ in range(args.sample):
        probs = torch.softmax(logits[-1, 0].float().cpu() / args.temperature, -1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(vocab[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return args.prompt + "".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.sample is not None:
        try:
            print(sample(args))
        except MissingDataError as e:
            raise SystemExit(f"error: {e}")
        return
    try:
        result, _ = train(args)
    except MissingDataError as e:
        raise SystemExit(f"error: {e}")
    if "valid_bpc" in result:
        print(f"{args.model}: {result['parameters']:,} parameters, {result['steps']} steps, train "
              f"{result['train_bpc_last50']:.3f} bpc (mean of the last 50 steps), valid {result['valid_bpc']:.3f} bpc, "
              f"test {result['test_bpc']:.3f} bpc")


if __name__ == "__main__":
    main()
