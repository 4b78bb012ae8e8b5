"""Dataset fingerprint -> plan (spacing, normalisation, patch, batch, network topology) and the model record."""

from medseg.planning.fingerprint import fingerprint
from medseg.planning.plan import load_plan, make_plan, plan_hash, save_plan
from medseg.planning.record import ModelRecord, load_model_record, write_model_record
from medseg.planning.schema import SCHEMA_VERSION, Configuration, NetworkSpec, Normalization, Plan

__all__ = ["fingerprint", "make_plan", "save_plan", "load_plan", "plan_hash", "Plan", "Configuration",
           "Normalization", "NetworkSpec", "SCHEMA_VERSION", "ModelRecord", "load_model_record",
           "write_model_record"]
