from client_agent.cli import main

main()
