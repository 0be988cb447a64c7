"""Tests for ots."""
