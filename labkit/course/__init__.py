"""The course's own tooling, apart from the lessons: the notebooks' first cell (colab), the exercises' checkers,
the teaching diagrams, stored outputs and their stamps, numbers in the prose, the static site and `make warm`."""
