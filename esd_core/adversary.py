"""Adversarial erasure: while the erasure trains, keep attacking it and erase what the attack finds.

Every ``adversarial_every`` updates, for each erased (concept, source) pair, a short attack of the kind
``esd-erase attack`` runs looks for a conditioning under which the model being trained still draws the source
text's images: the source's own encoded prompt plus an offset, trained for ``adversarial_steps`` Adam steps on
the denoising loss of images the frozen model drew for the source (each attack starts where the last one ended).
The conditioning found joins the erased set as a stand-in for the source: it is trained towards the source's ESD
target, computed by the frozen model from the texts themselves (``TrainingRun.targets``).
"""

import torch

from .attack import concept_latents, denoising_loss

# Images of each source text the inner attack learns from, drawn once by the frozen model.
ADVERSARIAL_IMAGES = 16
# The inner attack's Adam learning rate, relative to the RMS of the conditioning it perturbs.
ADVERSARIAL_LR = 0.05
# The largest offset, relative to the RMS of the conditioning it perturbs: a stand-in stays near its source text.
ADVERSARIAL_BUDGET = 0.5


def stand_in_name(source: str) -> str:
    """The key under which the conditioning found for ``source`` is kept among the run's encoded prompts."""
    return f"<adversarial {source}>"


class Adversary:
    """The attacks of one adversarial erasure: the source texts' images and offsets, and the stand-ins found."""

    def __init__(self, run):
        self.run = run
        self.sources = list(dict.fromkeys(source for _, source in run.config.pairs))
        with run.delta.switched(False):
            self.latents = {source: concept_latents(run.host, [source], ADVERSARIAL_IMAGES, run.generator,
                                                    run.config.sample_steps, run.config.sample_guidance)
                            for source in self.sources}
        self.offsets = {source: torch.zeros_like(run.conds[source][0], dtype=torch.float32) for source in self.sources}

    def attack(self) -> None:
        """Attack the model as trained so far, once per source text, and put what was found in the erased set."""
        run = self.run
        for source in self.sources:
            context, *rest = run.conds[source]
            offset = self.offsets[source].clone().requires_grad_(True)
            scale = context.float().pow(2).mean().sqrt().item()
            optimizer = torch.optim.Adam([offset], lr=ADVERSARIAL_LR * scale)
            with run.delta.switched(True):
                for _ in range(run.config.adversarial_steps):
                    conds = [((context + offset).to(context.dtype), *rest)] * run.config.batch_size
                    loss = denoising_loss(run.host, self.latents[source], conds, run.generator)
                    (offset.grad,) = torch.autograd.grad(loss, [offset])  # the erasure's own parameters get no gradient
                    optimizer.step()
                    with torch.no_grad():  # back onto the budget's sphere when it strays outside
                        offset.mul_(min(1.0, ADVERSARIAL_BUDGET * scale / max(offset.pow(2).mean().sqrt().item(), 1e-12)))
            self.offsets[source] = offset.detach()
            name = stand_in_name(source)
            run.conds[name] = ((context + self.offsets[source]).to(context.dtype), *rest)
            run.stand_ins[name] = source
            run.erased_pairs += [(concept, name) for concept, s in run.config.pairs if s == source and (concept, name) not in run.erased_pairs]
