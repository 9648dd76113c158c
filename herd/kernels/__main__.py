from herd.kernels import main

main()
