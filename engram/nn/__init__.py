"""Modules: the multi-head memory (table storage contract) and the Engram branch (DESIGN.md §3)."""
