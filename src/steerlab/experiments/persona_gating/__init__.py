"""Reproduce "Refusal Lives Downstream of Persona in Chat Models" (arXiv 2606.26161).

Claims checked on the loaded model, each with n, 95% intervals and paired tests:

1. adding a compliant-persona direction while the model generates lowers refusal;
2. random directions of the same norm (several seeds) do not;
3. re-adding the refusal direction restores refusal at late layers, not early ones;
4. projecting the persona direction out of a late window restores baseline refusal
   (an early window, or a random direction projected out late, does not).

The persona layer and strength are chosen on a validation split only; every
step is cached in the output folder so an interrupted run resumes.
"""

from steerlab.experiments.persona_gating.run import EXPERIMENT, run_persona_gating
from steerlab.experiments.persona_gating.select import choose_cell

__all__ = ["EXPERIMENT", "choose_cell", "run_persona_gating"]
