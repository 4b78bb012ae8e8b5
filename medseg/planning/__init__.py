"""Dataset fingerprint -> plan (spacing, normalisation, patch, batch, network topology)."""

from medseg.planning.fingerprint import fingerprint
from medseg.planning.plan import load_plan, make_plan, plan_hash, save_plan

__all__ = ["fingerprint", "make_plan", "save_plan", "load_plan", "plan_hash"]
