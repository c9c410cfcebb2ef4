"""Liquidation alerts: pure rules, and the alert log writer."""
