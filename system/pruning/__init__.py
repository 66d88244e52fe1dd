"""Pruning: complexity, pure surgery and transplant, and the methods (plug-ins)."""
