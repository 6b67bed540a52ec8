"""Pricing: dated price data with exact Decimal maths (see :mod:`llmtally.pricing.engine`)."""

from llmtally.pricing.engine import PriceBook, Quote, cost_from_rates

__all__ = ["PriceBook", "Quote", "cost_from_rates"]
