"""Sweep orchestration: plan, extraction stage, Ray Tune trials, summary."""
