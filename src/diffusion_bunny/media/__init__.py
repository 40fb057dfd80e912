"""Movies and pictures: probing and decoding movies, and the helpers every stage's figures share."""
