"""Jobs: compress, pipeline, demo, predict, bench, preprocess — orchestrations over the library layers."""
