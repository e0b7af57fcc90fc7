from hstu_opt.cli import main

main()
