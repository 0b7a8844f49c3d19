"""The main job (`make demo` / `xqat demo`): bundled data, training loop, reference nets and the pipeline."""
