"""Pricing: dated price data with exact Decimal maths, overrides, prices files and hot reload."""

from llmtally.pricing.engine import PriceBook, Quote, lookup_names
from llmtally.pricing.files import PriceFile, PriceFileError, load_price_file
from llmtally.pricing.rates import Rates, RateSheet, cost

__all__ = [
    "PriceBook",
    "PriceFile",
    "PriceFileError",
    "Quote",
    "RateSheet",
    "Rates",
    "cost",
    "load_price_file",
    "lookup_names",
]
