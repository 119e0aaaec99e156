"""CJS state features for the NetLLM scheduler, from the frozen pretrained Decima GNN.

    gnn = load_gnn("decima")        # or "random": Decima's architecture, seeded weights
    f = featurize(gnn, obs)         # Features: glob, pooled, candidates, caps

Per decision the FROZEN pretrained Decima GNN (``DecimaNet.encode``, as upstream NetLLM:
the graph encoder is pre-trained and then frozen) turns the active job DAGs into node,
DAG and global embeddings. From them:

* a **candidate** per runnable stage: ``[Decima node features (5), node emb (16),
  its DAG's emb (16)]`` (``CANDIDATE_DIM`` = 37), with its job's executor cap;
* two **state vectors** per decision: ``global`` = ``[global emb (16), active jobs / 10,
  committable executors / E, runnable stages / 10, releasing job present, total
  supply / E]`` (``GLOBAL_DIM`` = 21) and ``pooled`` = masked mean and max of the
  candidates (``POOLED_DIM`` = 74);
* the **action vector** (``action_vector``): ``[chosen candidate (37), limit / classes]``
  (``ACTION_DIM`` = 38); ``exec_mask`` allows the limits ``1..min(cap, classes)``.

``FEATURE_VERSION`` is recorded in every pool and adapter; pools of another version are
refused (``pool.check_pool``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from netllm.tasks.cjs.decima import DecimaNet, build_decima, load_decima_state_dict
from netllm.tasks.cjs.sim import NUM_NODE_FEATURES, CJSObservation
from netllm.utils import NetLLMError, torch_threads

EMBED_DIM = 16  # Decima's embedding width
CANDIDATE_DIM = NUM_NODE_FEATURES + 2 * EMBED_DIM  # 37
GLOBAL_DIM = EMBED_DIM + 5  # 21
POOLED_DIM = 2 * CANDIDATE_DIM  # 74
ACTION_DIM = CANDIDATE_DIM + 1  # chosen candidate + limit fraction
FEATURE_VERSION = 1


def load_gnn(source: str = "decima") -> DecimaNet:
    """The frozen graph encoder: ``decima`` (pretrained ``decima_model.pt``) or
    ``random`` (Decima's architecture, seeded random weights: tests, no data)."""
    if source == "decima":
        net = build_decima(load_decima_state_dict(), source="decima_model.pt")
    elif source == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = DecimaNet()
    else:
        raise NetLLMError(f"--gnn: 'decima' or 'random', got {source!r}")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@dataclass
class Features:
    """One decision's inputs (numpy): state tokens, candidates and their executor caps."""

    glob: np.ndarray  # (GLOBAL_DIM,)
    pooled: np.ndarray  # (POOLED_DIM,)
    candidates: np.ndarray  # (M, CANDIDATE_DIM)
    caps: np.ndarray  # (M,) int


def featurize(gnn: DecimaNet, obs: CJSObservation) -> Features:
    """Frozen GNN embeddings -> candidate features and the two state vectors."""
    return featurize_batch(gnn, [obs])[0]


def featurize_batch(gnn: DecimaNet, observations: list[CJSObservation]) -> list[Features]:
    """``featurize`` of several observations, their graphs through the GNN in one pass."""
    with torch_threads(1), torch.inference_mode():
        embeddings = gnn.encode_batch(observations)
    return [_features(obs, *emb) for obs, emb in zip(observations, embeddings)]


def _features(obs: CJSObservation, h: torch.Tensor, h_dag: torch.Tensor, h_glob: torch.Tensor) -> Features:
    idx = obs.runnable
    jobs = obs.node_job[idx]
    cand = np.concatenate([obs.node_features[idx], h[idx].numpy(), h_dag[jobs].numpy()], axis=1)
    cand = cand.astype(np.float32)
    E = float(obs.num_executors)
    scalars = np.array([obs.num_jobs / 10.0, obs.num_committable_execs / E, len(idx) / 10.0,
                        float(obs.source_job_idx < obs.num_jobs), float(obs.exec_supplies.sum()) / E],
                       dtype=np.float32)
    glob = np.concatenate([h_glob[0].numpy().astype(np.float32), scalars])
    if len(idx):
        pooled = np.concatenate([cand.mean(0), cand.max(0)])
    else:
        pooled = np.zeros(POOLED_DIM, dtype=np.float32)
    return Features(glob, pooled.astype(np.float32), cand, obs.commit_caps[jobs].astype(np.int64))


def action_vector(candidate: torch.Tensor, num_exec: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The action token's input: chosen candidate features + limit / classes."""
    return torch.cat([candidate.float(), (num_exec.float() / num_classes).unsqueeze(-1)], dim=-1)


def exec_mask(caps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., classes) bool: limits 1..min(cap, classes) allowed (at least 1)."""
    caps = caps.long().clamp(1, num_classes)
    return torch.arange(num_classes, device=caps.device) < caps.unsqueeze(-1)
