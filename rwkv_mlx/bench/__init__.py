"""The benchmark: measuring a model, the quality gate, and the recorded entries under results/."""
