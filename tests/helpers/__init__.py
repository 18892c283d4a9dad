"""What the tests share: composed configs, closed-form oracles, datasets fabricated in official formats, and
the callbacks and data modules that scale-out, resume and signal tests run in subprocesses."""
