"""Baselines measured in the same run as stagetx: the limits that stagetx figures are ratios of."""
