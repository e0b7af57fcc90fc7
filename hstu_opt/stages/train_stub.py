"""train-stub: a real, bounded training run of the recipe's model, evaluated against a popularity
baseline on the held-out (leave-one-out) split. Writes checkpoint/ and metrics.json."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from hstu_opt.data.batching import JaggedBatch, training_batch
from hstu_opt.data.metrics import PopularityScorer, evaluate
from hstu_opt.data.sequences import NUM_RATINGS, Sequences, load_sequences
from hstu_opt.data.splits import leave_one_out
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.model.checkpoint import save_checkpoint
from hstu_opt.model.config import HstuConfig
from hstu_opt.model.heads import l2_normalize
from hstu_opt.model.hstu import HstuModel
from hstu_opt.model.scoring import TorchScorer
from hstu_opt.recipe import Recipe
from hstu_opt.stages.base import Stage, StageContext


def build_model(recipe: Recipe, seqs: Sequences) -> HstuModel:
    cfg = HstuConfig.from_recipe(recipe.model, num_items=seqs.num_items, num_ratings=NUM_RATINGS,
                                 contextual_cardinality=seqs.contextual_cardinality)
    return HstuModel(cfg, dropout=recipe.train.dropout)


def loss_fn(model: HstuModel, batch: JaggedBatch, num_negatives: int, temperature: float, rank_weight: float,
            gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    states, layout = model.forward_jagged(batch.ids, batch.ratings, batch.timestamps, batch.offsets,
                                          batch.num_targets, batch.query_time)
    # Retrieval: sampled softmax of each history row's state against the item that followed it.
    rows = batch.next_item > 0
    q = l2_normalize(states[rows].float())  # [R, D]
    pos = batch.next_item[rows]
    negs = torch.randint(1, model.cfg.num_items + 1, (num_negatives,), generator=gen)
    table = l2_normalize(model.item_embedding(torch.cat([pos, negs])).float())
    pos_logit = (q * table[: len(pos)]).sum(-1, keepdim=True)
    neg_logit = q @ table[len(pos):].T
    neg_logit = neg_logit.masked_fill(pos[:, None] == negs[None, :], float("-inf"))  # accidental hits
    logits = torch.cat([pos_logit, neg_logit], dim=1) / temperature
    retrieval = F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))
    # Ranking: BCE per task on the candidate rows.
    tgt = layout.is_target
    rank_logits = model.ranking_logits(states[tgt], batch.ids[tgt]).float()
    ranking = F.binary_cross_entropy_with_logits(rank_logits, batch.target_labels)
    return retrieval + rank_weight * ranking, {"retrieval": retrieval.item(), "ranking": ranking.item()}


def train(model: HstuModel, seqs: Sequences, recipe: Recipe, ctx: StageContext) -> dict:
    tr = recipe.train
    rng = np.random.default_rng(tr.seed)
    gen = torch.Generator().manual_seed(tr.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    users = np.array([u for u in range(seqs.num_users) if len(seqs.items[u]) >= 4])
    steps_per_epoch = math.ceil(len(users) / tr.batch_size)
    t0, step, epochs_done, last = time.perf_counter(), 0, 0, {}
    model.train()
    with ctx.reporter.task("train-stub: training", tr.epochs * steps_per_epoch) as advance:
        for _ in range(tr.epochs):
            order = rng.permutation(users)
            for i in range(steps_per_epoch):
                batch = training_batch(seqs, order[i * tr.batch_size : (i + 1) * tr.batch_size], rng,
                                       recipe.model.max_history_len, tr.ranking_negatives, recipe.model.ranking_tasks)
                loss, last = loss_fn(model, batch, tr.num_negatives, tr.temperature, tr.ranking_loss_weight, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                advance(1)
            epochs_done += 1
            if time.perf_counter() - t0 > tr.max_seconds and epochs_done < tr.epochs:
                ctx.reporter.log(f"train-stub: stopped after {epochs_done}/{tr.epochs} epochs at train.max_seconds="
                                 f"{tr.max_seconds}: this checkpoint depends on machine speed (raise max_seconds)")
                break
    model.eval()
    return {"epochs": epochs_done, "epochs_planned": tr.epochs, "stopped_by_time": epochs_done < tr.epochs,
            "steps": step, "seconds": round(time.perf_counter() - t0, 2),
            "final_loss": {k: round(v, 4) for k, v in last.items()}}


class TrainStub(Stage):
    name = "train-stub"
    version = 4  # 2-4: projections as plain matmuls, output as three GEMMs (same math, other rounding)
    sections = ("model", "data", "train")

    def run(self, ctx: StageContext) -> dict:
        recipe = ctx.recipe
        torch.manual_seed(recipe.train.seed)
        torch.set_num_threads(recipe.train.threads)
        seqs = load_sequences(recipe.data, recipe.model.contextual_len)
        model = build_model(recipe, seqs)
        summary = train(model, seqs, recipe, ctx)
        tasks = recipe.model.ranking_tasks
        split = dict(max_history=recipe.model.max_history_len, num_negatives=recipe.train.eval_negatives,
                     tasks=tasks, seed=recipe.data.seed)
        test, val = leave_one_out(seqs, "test", **split), leave_one_out(seqs, "val", **split)
        scorer, baseline = TorchScorer(model), PopularityScorer(seqs.train_popularity(), len(tasks))
        with ctx.reporter.task("train-stub: evaluating", None):
            metrics = {"test": evaluate(test, scorer, tasks), "val": evaluate(val, scorer, tasks),
                       "popularity_test": evaluate(test, baseline, tasks)}
        data = {"fingerprint": seqs.fingerprint, "num_users": seqs.num_users, "num_items": seqs.num_items,
                "num_interactions": int(sum(len(s) for s in seqs.items))}
        save_checkpoint(ctx.out_dir / "checkpoint", model, {"metrics": metrics, "data": data, "train": summary})
        write_json_atomic(ctx.out_dir / "metrics.json", metrics)
        t, p = metrics["test"], metrics["popularity_test"]
        headline = (f"test HR@10 {t['hr@10']:.4f} (popularity {p['hr@10']:.4f}), "
                    f"NDCG@10 {t['ndcg@10']:.4f} (popularity {p['ndcg@10']:.4f})")
        return {"metrics": metrics, "data": data, "train": summary, "headline": headline}
