"""One training iteration per base, read beside BCP's train loop.

    teacher (train mode, as BCP/SSL4MIS): probabilities -> uncertainty U, pseudo-labels
    build the student's inputs, targets, per-pixel weights and source map
        supervised: labeled images only
        mt:  labeled + unlabeled images side by side (pseudo-labels, or MSE to the teacher)
        bcp: copy-paste mixes (one box mask for images, targets, U)
    weights: labeled pixels 1 + lambda_url [U > tau_l]  (URL; url_mode=term: weight 1 and a
             term of its own on [U > tau_l]); unlabeled pixels lambda_crl ramp(t) [U < tau_u]
             (CRL; crl_mode=soft: lambda_crl ramp(t) (1 - U))
    loss = (weighted CE + weighted Dice) / 2 per source region

`Steps` is the loop's half that computes: every network call and tensor function it uses was
prepared by the engine (`Loop.__init__`), so the same lines run eager on a CPU and compiled
on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from buarl.method.losses import mse_consistency, term_loss
from buarl.method.mixing import mix
from buarl.method.uncertainty import entropy_map, mc_probs, perturb
from buarl.method.weights import ramp, tau_u_at, weight_maps


class Steps:
    # ---- what every base uses ----------------------------------------------------------
    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """The teacher's softmax, batch norm per chunk of the batch (BCP: one per unlabeled half)."""
        cfg = self.cfg
        if cfg.uncertainty == "mc_entropy":
            with self.engine.autocast():
                parts = x.contiguous(memory_format=self.engine.fmt).chunk(chunks)
                return torch.cat([mc_probs(self.teacher, part, cfg.mc_passes, self.gen) for part in parts])
        self.teacher.train(cfg.teacher_mode == "train")
        return self.teacher_forward(x, chunks)

    def schedule(self, t: int) -> torch.Tensor:
        """tau_u and the CRL ramp at step t, as one tensor on the run's device (compiled code
        takes them as inputs: a value that changes per step never recompiles it)."""
        cfg, t_self = self.cfg, t - self.pretrain
        return self.engine.upload([tau_u_at(t_self, cfg.rampup_iters, cfg.tau_u, cfg.tau_u_start),
                                   ramp(t_self, cfg.rampup_iters)])

    def weights(self, u: torch.Tensor, source: torch.Tensor,
                schedule: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
        """URL on labeled pixels (source 1), CRL on unlabeled ones (source 0): the weights,
        URL's term region (url_mode=term, else None) and the dose (method/weights.py)."""
        cfg = self.cfg
        return weight_maps(u, source, url=cfg.url, crl=cfg.crl, tau_l=cfg.tau_l, tau_u=schedule[0],
                           lambda_url=cfg.lambda_url, lambda_crl=cfg.lambda_crl, ramp_value=schedule[1],
                           mode=cfg.region_mode, url_mode=cfg.url_mode, crl_mode=cfg.crl_mode)

    def loss(self, logits, target, weight, source, parts: int = 1, term: Optional[torch.Tensor] = None):
        """BCP's loss per source region; plus lambda_url times URL's own term on `term`'s pixels."""
        cfg = self.cfg
        loss = self.region_loss(logits, target, weight, source, cfg.dice_smooth, cfg.dice_form, parts)
        if term is not None:
            loss = loss + cfg.lambda_url * term_loss(logits, target, term, cfg.dice_smooth, cfg.dice_form, parts)
        return loss

    # ---- one iteration per base ----------------------------------------------------------
    def pretrain_step(self, x_l, y_l):
        """BCP pre-training: labeled pairs copy-pasted into each other, both regions supervised
        (ACDC: a loss per region; LA: one loss over the whole mixed image)."""
        half = x_l.shape[0] // 2
        m = self.box_mask(tuple(x_l.shape[2:]), self.cfg.paste_ratio, self.gen, x_l.device)
        x = mix(x_l[:half], x_l[half:], m)
        y = mix(y_l[:half], y_l[half:], m).long()
        source = m.expand_as(y).float() if self.cfg.pretrain_loss == "regions" else torch.ones_like(y, dtype=torch.float)
        return self.loss(self.student(x), y, torch.ones_like(source), source), {}

    def supervised_step(self, x_l, y_l, t):
        logits = self.student(x_l)
        source = torch.ones(y_l.shape, device=x_l.device)
        if not self.cfg.url:
            u = torch.zeros_like(source)
        elif self.cfg.uncertainty_source == "student":
            u = entropy_map(torch.softmax(logits.detach(), 1))
        else:
            u = entropy_map(self.teacher_probs(x_l))
        w, term, stats = self.weights(u, source, self.schedule(t))
        return self.loss(logits, y_l, w, source, term=term), stats

    def mt_step(self, x_l, y_l, x_u, t):
        """Mean teacher: labeled and unlabeled images in one student forward. The unlabeled
        loss is CE + Dice on the teacher's pseudo-labels (`pseudo`) or SSL4MIS's MSE between
        the softmaxes, the teacher seeing a noisy input (`mse`); CRL weights either."""
        cfg = self.cfg
        n = x_l.shape[0]
        logits = self.student(torch.cat([x_l, x_u]))
        x_t = x_u if cfg.mt_consistency == "pseudo" else perturb(x_u, self.gen)
        probs_t = self.teacher_probs(torch.cat([x_l, x_t]) if cfg.url and cfg.uncertainty_source == "teacher"
                                     else x_t)
        p_u = probs_t[-x_u.shape[0]:]
        if cfg.uncertainty_source == "student":
            u = entropy_map(torch.softmax(logits.detach(), 1))
        else:
            u_u = entropy_map(p_u)
            # Without URL the labeled weights ignore U, so the teacher skips labeled images.
            u_l = entropy_map(probs_t[:n]) if cfg.url else u_u.new_zeros((n,) + u_u.shape[1:])
            u = torch.cat([u_l, u_u])
        source = torch.cat([torch.ones_like(u[:n]), torch.zeros_like(u[n:])])
        w, term, stats = self.weights(u, source, self.schedule(t))
        if cfg.mt_consistency == "mse":
            return (self.loss(logits[:n], y_l, w[:n], source[:n], term=None if term is None else term[:n])
                    + mse_consistency(logits[n:], p_u, w[n:])), stats
        plab = self.pseudo_labels(p_u)
        stats["pseudo_fg"] = (plab > 0).float().mean()
        return self.loss(logits, torch.cat([y_l, plab]), w, source, term=term), stats

    def bcp_step(self, x_l, y_l, x_u, t):
        """Bidirectional copy-paste: a labeled box into an unlabeled image and vice versa,
        each mixed batch forwarded as its own half and given its own mix loss, as in BCP."""
        cfg = self.cfg
        chunks = 2 if cfg.split_forward else 1
        # Without URL (or with the student's U) the labeled weights ignore the teacher's U,
        # so the teacher skips the labeled images, as BCP's does. With it, one teacher call
        # sees both (the unlabeled batch's chunks first).
        p_l = None
        if cfg.url and cfg.uncertainty_source == "teacher":
            p_u, p_l = self.teacher_probs(torch.cat([x_u, x_l]), 2 * chunks).split([len(x_u), len(x_l)])
        else:
            p_u = self.teacher_probs(x_u, chunks)
        plab = self.pseudo_labels(p_u)
        m = self.box_mask(tuple(x_l.shape[2:]), cfg.paste_ratio, self.gen, x_l.device)
        schedule = self.schedule(t)
        student_u = cfg.uncertainty_source == "student"  # its weights wait for the student's logits
        x, target, source, w, term, stats = self.bcp_batch(x_l, y_l, x_u, p_u, p_l, plab, m,
                                                           None if student_u else schedule)
        logits = self.student(x, chunks)
        if student_u:
            w, term, weight_stats = self.weights(entropy_map(torch.softmax(logits.detach(), 1)), source, schedule)
            stats.update(weight_stats)
        return self.loss(logits, target, w, source, parts=2, term=term), stats

    def copy_paste_batch(self, x_l, y_l, x_u, p_u, p_l, plab, m, schedule):
        """The student's copy-paste batch: images, targets (pseudo-labels outside the labeled
        box), the source map and, given a `schedule`, the weights from the teacher's mixed
        uncertainty (the labeled images' zero without `p_l`), URL's term region and the dose.
        Tensor code only: one compiled graph in a compiled run (`bcp_batch`)."""
        h = x_l.shape[0] // 2
        # mix(a, b, m) keeps a outside the box and b inside it.
        x = torch.cat([mix(x_u[:h], x_l[:h], m), mix(x_l[h:], x_u[h:], m)])
        target = torch.cat([mix(plab[:h], y_l[:h], m), mix(y_l[h:], plab[h:], m)]).long()
        ones = torch.ones_like(plab[:h], dtype=torch.float)
        source = torch.cat([mix(0 * ones, ones, m), mix(ones, 0 * ones, m)])
        w, term, stats = None, None, {}
        if schedule is not None:
            u_u = entropy_map(p_u)
            u_l = entropy_map(p_l) if p_l is not None else torch.zeros_like(u_u)
            u = torch.cat([mix(u_u[:h], u_l[:h], m), mix(u_l[h:], u_u[h:], m)])
            w, term, stats = self.weights(u, source, schedule)
        stats["pseudo_fg"] = (plab > 0).float().mean()
        return x, target, source, w, term, stats
