"""Detrimental-data repair (issue 11): find the harmful training samples with a trusted clean set, keep what is
beneficial in them (their inputs, relabelled), unlearn what is detrimental, anchored on the clean set.

``registry.repair_data`` runs a method by name; docs/datarepair.md gives the method, its design and why.
"""
