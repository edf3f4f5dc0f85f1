"""The course's machinery, which notebooks never import: the notebook build, execution, grading in a
sandbox, benchmarks and the `course` command line."""
