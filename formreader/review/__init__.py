"""The human side: the review station (decisions, and its local web server, which also serves
the drawing pad) and the inspect picture."""
