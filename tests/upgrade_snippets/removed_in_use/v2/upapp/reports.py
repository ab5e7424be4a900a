from upapp import legacy
