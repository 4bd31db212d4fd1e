"""Circle packing in the unit square (sum of radii): genome, optimiser, strict validator."""
