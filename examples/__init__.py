"""The seven customizations of SPEC §7, one module each; run any of them with ``python examples/<file>.py``."""
