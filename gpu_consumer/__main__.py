from gpu_consumer.main import main

if __name__ == "__main__":
    main()
