"""Test helpers shipped with llmtally: a fake upstream speaking each provider's wire format."""

from llmtally.testing.fake_upstream import FakeUpstream, FakeUpstreamConfig, FakeUsage

__all__ = ["FakeUpstream", "FakeUpstreamConfig", "FakeUsage"]
