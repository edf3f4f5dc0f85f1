"""Every week's exercise checks, one module per week (`weekN.py`, or `weekN_<part>.py` when a week's
checks are written in parts). `course_utils.exercises` imports them on demand: a check of exercise
"3.2" imports only week 3's modules."""
