"""What a sample is conditioned or guided on, as plan additions: class labels and prompts
(classifier-free), classifier and CLIP gradients, and in-painting's known pixels."""
