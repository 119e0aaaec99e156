"""Decima's network (Mao et al., SIGCOMM'19, as re-implemented by spark-sched-sim) and
its pretrained weights.

    net = build_decima(load_decima_state_dict())   # cjs/pretrained/decima_model.pt
    h, h_dag, h_glob = net.encode(obs)             # node, DAG and global embeddings

A GNN over the job DAGs — node embeddings by child-to-parent message passing one
topological generation at a time, DAG embeddings (sum over nodes) and a global embedding
(sum over DAGs) — then a stage-scoring MLP (one score per schedulable stage) and an
executor-limit MLP for the chosen stage's job (one score per limit ``1..cap``). Its
weights come from ``cjs/pretrained/decima_model.pt`` (a plain state dict) and its inputs
are the ``CJSObservation`` views that reproduce spark-sched-sim's ``DAGNNObsWrapper``
(``node_features``, ``edge_masks``, ``exec_mask``).

The Decima scheduler (sampling from these scores) is in ``baselines.py``; the NetLLM
scheduler's state features (the frozen encoder) in ``features.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from netllm.tasks.cjs.sim import NUM_DAG_FEATURES, NUM_NODE_FEATURES, CJSObservation, dag_layer_edge_masks
from netllm.utils import NetLLMError


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, act: type[nn.Module], **act_kw: Any) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = (in_dim, *hidden)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act(**act_kw)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class DecimaNet(nn.Module):
    """Decima's actor; parameter names match spark-sched-sim's ``DecimaScheduler.actor``."""

    def __init__(self, embed_dim: int = 16, gnn_hidden: tuple[int, ...] = (32, 16),
                 policy_hidden: tuple[int, ...] = (64, 64), node_dim: int = NUM_NODE_FEATURES,
                 dag_dim: int = NUM_DAG_FEATURES):
        super().__init__()
        gnn = dict(act=nn.LeakyReLU, negative_slope=0.2)
        self.embed_dim = embed_dim
        self.encoder = nn.ModuleDict({
            "node_encoder": nn.ModuleDict({
                "mlp_prep": _mlp(node_dim, gnn_hidden, embed_dim, **gnn),
                "mlp_msg": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn),
                "mlp_update": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn),
            }),
            "dag_encoder": nn.ModuleDict({"mlp": _mlp(node_dim + embed_dim, gnn_hidden, embed_dim, **gnn)}),
            "global_encoder": nn.ModuleDict({"mlp": _mlp(embed_dim, gnn_hidden, embed_dim, **gnn)}),
        })
        self.stage_policy_network = nn.ModuleDict(
            {"mlp_score": _mlp(node_dim + 3 * embed_dim, policy_hidden, 1, act=nn.Tanh)})
        self.exec_policy_network = nn.ModuleDict(
            {"mlp_score": _mlp(dag_dim + 2 * embed_dim + 1, policy_hidden, 1, act=nn.Tanh)})

    def encode(self, obs: CJSObservation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node (N, d), DAG (J, d) and global (1, d) embeddings of one observation."""
        x = torch.from_numpy(obs.node_features)
        h = self._node_embeddings(x, obs.edge_links, obs.edge_masks)
        node_job = torch.from_numpy(obs.node_job)
        per_node = self.encoder["dag_encoder"]["mlp"](torch.cat([x, h], dim=1))
        h_dag = torch.zeros(obs.num_jobs, h.shape[1]).index_add_(0, node_job, per_node)
        h_glob = self.encoder["global_encoder"]["mlp"](h_dag).sum(0, keepdim=True)
        return h, h_dag, h_glob

    def encode_batch(self, observations: list[CJSObservation]
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``encode`` of several observations (of independent simulators) in one pass: their
        graphs side by side, message passing one topological generation at a time over all
        of them (a graph's generations keep their order; graphs never exchange messages)."""
        if len(observations) == 1:
            return [self.encode(observations[0])]
        nodes = [o.num_nodes for o in observations]
        jobs = [o.num_jobs for o in observations]
        node_off, job_off = np.cumsum([0, *nodes[:-1]]), np.cumsum([0, *jobs[:-1]])
        x = torch.from_numpy(np.concatenate([o.node_features for o in observations]))
        edges = np.concatenate([o.edge_links + off for o, off in zip(observations, node_off)])
        # a graph without edges keeps its prepared embeddings (``encode``'s rule), even here
        alone = torch.from_numpy(np.repeat([o.edge_masks.shape[0] == 0 for o in observations], nodes))
        h = self._node_embeddings(x, edges, dag_layer_edge_masks(edges, int(sum(nodes))), alone)
        node_job = torch.from_numpy(np.concatenate([o.node_job + off for o, off in zip(observations, job_off)]))
        per_node = self.encoder["dag_encoder"]["mlp"](torch.cat([x, h], dim=1))
        h_dag = torch.zeros(int(sum(jobs)), h.shape[1]).index_add_(0, node_job, per_node)
        job_graph = torch.repeat_interleave(torch.arange(len(observations)), torch.tensor(jobs))
        h_glob = torch.zeros(len(observations), h.shape[1]).index_add_(
            0, job_graph, self.encoder["global_encoder"]["mlp"](h_dag))
        return [(hh, hd, h_glob[i:i + 1]) for i, (hh, hd) in
                enumerate(zip(h.split(nodes), h_dag.split(jobs)))]

    def _node_embeddings(self, x: torch.Tensor, edge_links: np.ndarray, masks: np.ndarray,
                         alone: torch.Tensor | None = None) -> torch.Tensor:
        """Message passing; nodes marked ``alone`` (of a graph without edges) keep ``mlp_prep``."""
        enc = self.encoder["node_encoder"]
        if masks.shape[0] == 0:
            return enc["mlp_prep"](x)
        edges = torch.from_numpy(edge_links)
        h_init = enc["mlp_prep"](x)
        h = torch.zeros_like(h_init)
        leaf = torch.ones(len(x), dtype=torch.bool)
        leaf[edges[:, 0]] = False
        if alone is not None:
            h[alone] = h_init[alone]
            leaf &= ~alone
        h[leaf] = enc["mlp_update"](h_init[leaf])
        for mask in masks[::-1]:  # deepest generation first: children tell parents
            e = edges[torch.from_numpy(mask)]
            parent, child = e[:, 0], e[:, 1]
            agg = torch.zeros_like(h).index_add_(0, parent, enc["mlp_msg"](h[child]))
            receivers = torch.unique(parent)
            h[receivers] = h_init[receivers] + enc["mlp_update"](agg[receivers])
        return h

    def stage_logits(self, obs: CJSObservation, h: torch.Tensor, h_dag: torch.Tensor,
                     h_glob: torch.Tensor) -> torch.Tensor:
        """One score per schedulable stage (order of ``obs.runnable``)."""
        idx = torch.from_numpy(obs.runnable)
        x = torch.from_numpy(obs.node_features)[idx]
        jobs = torch.from_numpy(obs.node_job)[idx]
        inputs = torch.cat([x, h[idx], h_dag[jobs], h_glob.expand(len(idx), -1)], dim=1)
        return self.stage_policy_network["mlp_score"](inputs).squeeze(-1)

    def exec_logits(self, obs: CJSObservation, job_idx: int, h_dag: torch.Tensor,
                    h_glob: torch.Tensor) -> torch.Tensor:
        """One score per executor limit ``1..cap`` of job ``job_idx``."""
        cap = int(obs.commit_caps[job_idx])
        x_dag = torch.from_numpy(obs.dag_features[job_idx])
        limits = (torch.arange(obs.num_executors, dtype=torch.float32) / obs.num_executors)[:cap]
        inputs = torch.cat([
            torch.cat([x_dag, h_dag[job_idx], h_glob[0]]).expand(cap, -1), limits[:, None]], dim=1)
        return self.exec_policy_network["mlp_score"](inputs).squeeze(-1)


def load_decima_state_dict(path: str | os.PathLike[str] | None = None,
                           root: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The trained Decima weights (``cjs/pretrained/decima_model.pt``), tensors only."""
    if path is None:
        from netllm.data import dataset_path

        path = dataset_path("cjs", "pretrained", "decima_model.pt", root=root)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NetLLMError(f"{path}: missing; run 'netllm data fetch cjs' or set NETLLM_DATA") from None
    except Exception as err:  # truncated zip, pickle with objects, ...
        raise NetLLMError(f"{path}: not a loadable tensor state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NetLLMError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def build_decima(state_dict: dict[str, torch.Tensor] | None = None, source: str = "state_dict") -> DecimaNet:
    """A ``DecimaNet`` sized from ``state_dict`` (if given) and loaded with it."""
    if state_dict is None:
        return DecimaNet()
    try:
        embed = int(state_dict["encoder.node_encoder.mlp_prep.4.weight"].shape[0])
        gnn = tuple(int(state_dict[f"encoder.node_encoder.mlp_prep.{i}.weight"].shape[0]) for i in (0, 2))
        pol = tuple(int(state_dict[f"stage_policy_network.mlp_score.{i}.weight"].shape[0]) for i in (0, 2))
    except KeyError as err:
        raise NetLLMError(f"{source}: not a Decima state dict (missing {err.args[0]!r})") from None
    net = DecimaNet(embed, gnn, pol)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise NetLLMError(f"{source}: weights do not fit Decima: {' '.join(first[:3])}") from None
    return net
