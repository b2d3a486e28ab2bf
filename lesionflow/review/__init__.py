"""The reviewers' loop: what the server answered (``log``), and which images reviewers label next
(``strategies``, ``queue``)."""
