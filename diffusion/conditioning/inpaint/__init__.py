"""In-painting: mask files and pictures (`files`), training masks (`masks`), and the three methods
(`methods`): GLIDE's mask channels, replace, and RePaint."""
