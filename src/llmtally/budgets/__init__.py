"""Spend limits (``[budgets]``): rules, a store shared by the fleet (Redis) or one pod (memory), and
the gate every metered call passes before it goes upstream. See docs/budgets.md."""

from llmtally.budgets.gate import (
    GO,
    REFUSED,
    Admission,
    BudgetAsk,
    Budgets,
    GateServer,
    LocalGate,
    RemoteGate,
    ask_for,
)
from llmtally.budgets.rules import BudgetKey, CallFacts, keys_for, to_nano
from llmtally.budgets.store import MemoryStore, RedisStore

__all__ = [
    "GO",
    "REFUSED",
    "Admission",
    "BudgetAsk",
    "BudgetKey",
    "Budgets",
    "CallFacts",
    "GateServer",
    "LocalGate",
    "MemoryStore",
    "RedisStore",
    "RemoteGate",
    "ask_for",
    "keys_for",
    "to_nano",
]
