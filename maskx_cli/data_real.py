"""``maskx data prepare-*``: real data sets (filled in with the Visual Genome / LVIS preparation)."""
