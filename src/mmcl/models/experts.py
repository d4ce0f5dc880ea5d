"""Expandable projector experts (P3's EProj): copies of a pretrained projector, one per task slot, and a router
that sends each sample to an expert by keys on its media feature and its instruction.

The composition calls a routing projector with the token ids of the rows it serves (`routes = True`), so routing
happens inside the model's own forward and generate, batched: no batch-1 inference, no hook in the engine.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ExpertProjector(nn.Module):
    """`n_slots` experts initialised from `base`, a media key and an instruction key per task slot, and a frozen
    snapshot of the language model's input embeddings for the instruction query.

    - `active` set (training a task): every item goes through expert `active`.
    - `active` None and no slot in use yet (row 0 of the matrix): expert 0, still the pretrained projector.
    - `active` None (evaluation): item j goes to the expert of the slot k maximising
      cos(q_feat_j, K_feat[k]) + cos(q_inst_j, K_inst[k]) over the slots in `slots_in_use`;
      q_feat = mean of the projector's input features over tokens, q_inst = mean of the embedding snapshot over
      the row's tokens that are not padding or media placeholders (the prompt, at evaluation).
    `slot_expert[k]` is the expert a slot uses (several slots may share one: similarity-informed expansion).
    """

    routes = True

    def __init__(self, base: nn.Module, n_slots: int, feat_dim: int, text_table: torch.Tensor,
                 ignore_ids: list[int]):
        super().__init__()
        self.pools_tokens = bool(getattr(base, "pools_tokens", False))
        self.experts = nn.ModuleList([copy.deepcopy(base) for _ in range(n_slots)])
        self.key_feat = nn.Parameter(torch.rand(n_slots, feat_dim))  # uniform init, as P3
        self.key_inst = nn.Parameter(torch.rand(n_slots, text_table.shape[1]))
        self.register_buffer("text_table", text_table.detach().clone())
        self.register_buffer("ignore_ids", torch.tensor(sorted(set(ignore_ids)), dtype=torch.long))
        self.slot_expert: list[int] = list(range(n_slots))
        self.slots_in_use: list[int] = []
        self.active: int | None = None
        self.last_route: torch.Tensor | None = None  # the slots chosen at the last routed call

    def feat_query(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float().mean(1)

    def inst_query(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean embedding-snapshot row over each row's non-pad, non-placeholder tokens, (N, H)."""
        keep = ~torch.isin(ids, self.ignore_ids.to(ids.device))
        emb = self.text_table[ids.clamp(max=self.text_table.shape[0] - 1)].float()
        w = keep.unsqueeze(-1).float()
        return (emb * w).sum(1) / w.sum(1).clamp(min=1.0)

    def route(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each item among `slots_in_use`, shape (N,)."""
        if not self.slots_in_use:
            raise RuntimeError("EProj: no expert has been trained yet, nothing to route to")
        slots = torch.tensor(self.slots_in_use, device=feats.device)
        cf = nn.functional.cosine_similarity(self.feat_query(feats)[:, None], self.key_feat[slots][None].float(), -1)
        ci = nn.functional.cosine_similarity(self.inst_query(ids)[:, None], self.key_inst[slots][None].float(), -1)
        return slots[(cf + ci).argmax(1)]

    def forward(self, feats: torch.Tensor, route_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.active is not None:
            return self.experts[self.slot_expert[self.active]](feats)
        if not self.slots_in_use:  # before any task (row 0): every expert is still the pretrained projector
            return self.experts[0](feats)
        if route_ids is None:
            raise RuntimeError("EProj: routing needs the rows' token ids (the model passes them)")
        chosen = self.route(feats, route_ids)
        self.last_route = chosen.detach().cpu()
        experts = torch.tensor([self.slot_expert[int(s)] for s in chosen.tolist()], device=feats.device)
        out = None
        for e in experts.unique().tolist():
            rows = (experts == e).nonzero().squeeze(1)
            y = self.experts[e](feats.index_select(0, rows))
            if out is None:
                out = y.new_zeros((feats.shape[0], *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        assert out is not None
        return out
